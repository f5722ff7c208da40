"""Headless OpenGL mesh rasteriser for SMPL-X condition images (the mesh picture the ControlNet branch is given).

moderngl on a standalone EGL context: Mesa llvmpipe on a CPU-only machine, the GPU driver where there is one, with
no X server and no window. The look follows the official release (light blue-grey mesh on black, ambient 0.3) so that
conditions match what the paper's models were trained on.
"""

from __future__ import annotations

from types import TracebackType
from typing import Self

import moderngl
import numpy as np
import scipy.sparse as sp

from core.errors import AnchorError

MESH_COLOR = (0.3, 0.5, 0.55)
SYSTEM_PACKAGES = "libegl1 libegl-mesa0 libgl1-mesa-dri libgl1"

# Smooth normals arrive interpolated; GL's default front face is counter-clockwise in window space. Because the
# projection maps image rows downwards (y down, like OpenCV), a triangle whose (v1-v0)x(v2-v0) normal points towards
# the camera is clockwise on screen, i.e. GL calls it a back face. Flipping on gl_FrontFacing therefore turns the
# normal towards the viewer whatever the mesh's winding convention, which lights the inside of an open mouth.
_VERTEX_SHADER = """
#version 330
uniform mat4 proj;
in vec3 in_pos;
in vec3 in_normal;
out vec3 v_pos;
out vec3 v_normal;
void main() {
    v_pos = in_pos;
    v_normal = in_normal;
    gl_Position = proj * vec4(in_pos, 1.0);
}
"""

# The same pair with a colour per vertex (the hand crops' per-finger colours): the colour is interpolated like the
# normal and replaces the uniform one.
_VERTEX_SHADER_COLORED = (
    _VERTEX_SHADER.replace("in vec3 in_normal;", "in vec3 in_normal;\nin vec3 in_color;\nout vec3 v_color;")
    .replace("v_normal = in_normal;", "v_normal = in_normal;\n    v_color = in_color;"))

_FRAGMENT_SHADER = """
#version 330
uniform vec3 color;
uniform float ambient;
uniform vec3 light;
in vec3 v_pos;
in vec3 v_normal;
out vec4 f_color;
void main() {
    float len = length(v_normal);
    vec3 n = len > 1e-12 ? v_normal / len : normalize(-v_pos);
    if (gl_FrontFacing) n = -n;
    float diffuse = max(dot(n, light), 0.0);
    f_color = vec4(color * (ambient + (1.0 - ambient) * diffuse), 1.0);
}
"""


_FRAGMENT_SHADER_COLORED = _FRAGMENT_SHADER.replace("uniform vec3 color;", "in vec3 v_color;").replace(
    "vec4(color *", "vec4(v_color *")


class RasterizerUnavailable(AnchorError, RuntimeError):
    """No usable OpenGL: almost always missing system libraries, which pip cannot install."""


def gl_context() -> moderngl.Context:
    """A standalone EGL context, or a one-line error saying which system packages to install."""
    try:
        return moderngl.create_standalone_context(backend="egl", require=330)
    except Exception as exc:  # glcontext raises bare Exception for every EGL failure
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise RasterizerUnavailable(
            f"cannot create a headless OpenGL (EGL) context: {detail}; "
            f"install the system packages: apt-get install {SYSTEM_PACKAGES}"
        ) from exc


def _check_intrinsics(K: np.ndarray) -> np.ndarray:
    K = np.asarray(K, dtype=np.float64)
    if K.shape != (3, 3) or not np.allclose(K[2], (0.0, 0.0, 1.0)) or not np.all(np.isfinite(K)):
        raise ValueError(f"K must be a finite 3x3 pinhole matrix with last row (0, 0, 1), got {K.tolist()}")
    return K


def project(vertices: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Pixel coordinates (u, v) of camera-space points, the same mapping the renderer rasterises with.

    A point lands in column floor(u), row floor(v). Points at or behind the camera (z <= 0) have no image: NaN.
    """
    K = _check_intrinsics(K)
    pts = np.asarray(vertices, dtype=np.float64).reshape(-1, 3)
    hom = pts @ K.T
    z = hom[:, 2:3]
    with np.errstate(divide="ignore", invalid="ignore"):
        uv = hom[:, :2] / z
    uv[(z <= 0)[:, 0]] = np.nan
    return uv


def _projection(K: np.ndarray, size: int, near: float, far: float) -> np.ndarray:
    """OpenCV intrinsics as a GL clip matrix whose window coordinates are pixels with y down.

    Window x = u and window y = v, so glReadPixels' bottom-up row order already yields row 0 = image top.
    """
    K = _check_intrinsics(K)
    P = np.zeros((4, 4), dtype=np.float64)
    P[0, :3] = 2.0 * K[0] / size - (0.0, 0.0, 1.0)
    P[1, :3] = 2.0 * K[1] / size - (0.0, 0.0, 1.0)
    P[2, 2:] = ((far + near) / (far - near), -2.0 * far * near / (far - near))
    P[3, 2] = 1.0
    return P


class MeshRasterizer:
    """Renders one fixed-topology mesh, pose after pose, into a reused framebuffer.

    Everything per-frame that can be prepared once is: GPU buffers, the face-to-vertex incidence used for smooth
    normals, and the index buffer (with degenerate triangles dropped, as they never cover a pixel). Each render makes
    the context current on the calling thread, so a renderer may move between threads but must not be shared by two
    at once.
    """

    def __init__(
        self,
        faces: np.ndarray,
        size: int,
        *,
        color: tuple[float, float, float] = MESH_COLOR,
        ambient: float = 0.3,
        light_dir: tuple[float, float, float] = (0.0, -0.3, -1.0),
        near: float = 0.01,
        far: float = 100.0,
        ctx: moderngl.Context | None = None,
        vertex_colors: np.ndarray | None = None,
    ) -> None:
        """light_dir points from the scene towards the light, in camera coordinates; the default is a light at the
        camera, a little above it (y is down). Shade = color * (ambient + (1 - ambient) * max(n.l, 0)).
        `vertex_colors` (V, 3) in [0, 1], when given, colour each vertex instead of `color`."""
        faces = np.asarray(faces)
        if faces.ndim != 2 or faces.shape[1] != 3 or not np.issubdtype(faces.dtype, np.integer):
            raise ValueError(f"faces must be an (F, 3) integer array, got {faces.dtype} {faces.shape}")
        if faces.size and faces.min() < 0:
            raise ValueError("faces contain negative vertex indices")
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        if not 0.0 < near < far:
            raise ValueError(f"need 0 < near < far, got near={near} far={far}")
        light = np.asarray(light_dir, dtype=np.float64)
        if light.shape != (3,) or not np.linalg.norm(light) > 0:
            raise ValueError(f"light_dir must be a non-zero 3-vector, got {light_dir}")

        self.size = int(size)
        self.near, self.far = float(near), float(far)
        self._min_vertices = int(faces.max()) + 1 if faces.size else 0
        self._faces = faces[
            (faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])
        ].astype(np.int32)
        n_faces = len(self._faces)
        # Incidence (V, F): summing area-weighted face normals into vertices is one sparse product per frame.
        self._incidence = sp.csr_matrix(
            (np.ones(3 * n_faces, np.float32), (self._faces.ravel(), np.repeat(np.arange(n_faces), 3))),
            shape=(self._min_vertices, n_faces),
        )
        self._colors = None if vertex_colors is None else np.asarray(vertex_colors, np.float32)
        if self._colors is not None and (self._colors.ndim != 2 or self._colors.shape[1] != 3
                                         or len(self._colors) < self._min_vertices):
            raise ValueError(f"vertex_colors must be (V, 3) with V >= {self._min_vertices}, got "
                             f"{self._colors.shape}")
        # interleaved position, normal (and colour); sized on first render
        self._width = 6 if self._colors is None else 9
        self._attribs = np.zeros((0, self._width), dtype=np.float32)

        self._own_ctx = ctx is None
        self.ctx = gl_context() if ctx is None else ctx
        with self.ctx:
            if self._colors is None:
                self._prog = self.ctx.program(vertex_shader=_VERTEX_SHADER, fragment_shader=_FRAGMENT_SHADER)
                self._prog["color"].value = tuple(float(c) for c in color)
            else:
                self._prog = self.ctx.program(vertex_shader=_VERTEX_SHADER_COLORED,
                                              fragment_shader=_FRAGMENT_SHADER_COLORED)
            self._prog["ambient"].value = float(ambient)
            self._prog["light"].value = tuple(light / np.linalg.norm(light))
            self._ibo = self.ctx.buffer(self._faces.tobytes()) if n_faces else None
            self._vbo: moderngl.Buffer | None = None
            self._vao: moderngl.VertexArray | None = None
            self._color_rb = self.ctx.renderbuffer((self.size, self.size), components=4)
            self._depth_rb = self.ctx.depth_renderbuffer((self.size, self.size))
            self._fbo = self.ctx.framebuffer(color_attachments=[self._color_rb], depth_attachment=self._depth_rb)
        self._released = False

    def _normals(self, v: np.ndarray) -> np.ndarray:
        """Area-weighted smooth normals of the posed mesh; vertices touching no face get (0, 0, 0)."""
        tri = v[self._faces]
        face_n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        n = self._incidence @ face_n
        length = np.linalg.norm(n, axis=1, keepdims=True)
        np.divide(n, length, out=n, where=length > 0)
        return n

    def _upload(self, v: np.ndarray) -> None:
        """Write the frame's vertices and normals into the one VBO (recreated only if the vertex count changes)."""
        if len(v) != len(self._attribs):
            self._attribs = np.zeros((len(v), self._width), dtype=np.float32)
            for obj in (self._vao, self._vbo):
                if obj is not None:
                    obj.release()
            self._vbo = self.ctx.buffer(reserve=self._attribs.nbytes)
            layout = ("3f 3f", "in_pos", "in_normal") if self._colors is None else (
                "3f 3f 3f", "in_pos", "in_normal", "in_color")
            self._vao = self.ctx.vertex_array(self._prog, [(self._vbo, *layout)], index_buffer=self._ibo)
            if self._colors is not None:
                k = min(len(v), len(self._colors))
                self._attribs[:k, 6:] = self._colors[:k]
        self._attribs[:, :3] = v
        self._attribs[: self._min_vertices, 3:6] = self._normals(v)
        self._vbo.write(self._attribs)

    def _draw(self, vertices: np.ndarray, K: np.ndarray, out: np.ndarray) -> None:
        if self._released:
            raise RuntimeError("MeshRasterizer used after release()")
        v = np.asarray(vertices, dtype=np.float32)
        if v.ndim != 2 or v.shape[1] != 3 or len(v) < self._min_vertices:
            raise ValueError(f"vertices must be (V, 3) with V >= {self._min_vertices} for these faces, got {v.shape}")
        if not np.all(np.isfinite(v)):
            raise ValueError("vertices contain NaN or inf")
        proj = _projection(K, self.size, self.near, self.far)
        with self.ctx:  # make this renderer's context current: several may live in one thread
            self._fbo.use()
            self._fbo.clear(0.0, 0.0, 0.0, 1.0, depth=1.0)
            if self._ibo is not None:
                self._upload(v)
                self._prog["proj"].write(proj.T.astype(np.float32).tobytes())  # GL matrices are column-major
                self.ctx.enable(moderngl.DEPTH_TEST)
                self.ctx.disable(moderngl.CULL_FACE | moderngl.BLEND)
                self._vao.render(moderngl.TRIANGLES)
            self._fbo.read_into(out, components=3, alignment=1)

    def render(self, vertices: np.ndarray, K: np.ndarray) -> np.ndarray:
        """(size, size, 3) uint8 RGB; a vertex projecting to (u, v) by K appears at out[floor(v), floor(u)]."""
        out = np.empty((self.size, self.size, 3), dtype=np.uint8)
        self._draw(vertices, K, out)
        return out

    def render_batch(self, vertices: np.ndarray, K: np.ndarray) -> np.ndarray:
        """(T, size, size, 3) for (T, V, 3) vertices; K is one (3, 3) matrix or one per frame (T, 3, 3)."""
        vertices = np.asarray(vertices)
        if vertices.ndim != 3:
            raise ValueError(f"vertices must be (T, V, 3), got {vertices.shape}")
        Ks = np.asarray(K, dtype=np.float64)
        Ks = np.broadcast_to(Ks, (len(vertices), 3, 3)) if Ks.ndim == 2 else Ks
        if Ks.shape != (len(vertices), 3, 3):
            raise ValueError(f"K must be (3, 3) or ({len(vertices)}, 3, 3), got {np.shape(K)}")
        out = np.empty((len(vertices), self.size, self.size, 3), dtype=np.uint8)
        for t in range(len(vertices)):
            self._draw(vertices[t], Ks[t], out[t])
        return out

    def release(self) -> None:
        """Free GL objects now (and the context if this renderer made it) rather than at interpreter exit."""
        if self._released:
            return
        self._released = True
        with self.ctx:
            for obj in (self._vao, self._ibo, self._vbo, self._fbo, self._color_rb, self._depth_rb, self._prog):
                if obj is not None:
                    obj.release()
        if self._own_ctx:
            self.ctx.release()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
