"""The condition-image renderer: geometry must agree with `project` (landmarks are drawn with it), shading must look
like the official release, and output must be byte-stable (condition images feed content hashes)."""

from __future__ import annotations

from collections.abc import Iterator

import moderngl
import numpy as np
import pytest
from scipy.spatial import ConvexHull

from models.raster import MESH_COLOR, MeshRasterizer, RasterizerUnavailable, gl_context, project

SIZE = 128
# Off-centre principal point and fx != fy, so a transposed or flipped image cannot pass.
K = np.array([[150.0, 0.0, 60.3], [0.0, 170.0, 70.7], [0.0, 0.0, 1.0]])
BOX_FACES = np.array(
    [[0, 2, 1], [0, 3, 2], [4, 5, 6], [4, 6, 7], [0, 1, 5], [0, 5, 4],
     [2, 3, 7], [2, 7, 6], [1, 2, 6], [1, 6, 5], [0, 4, 7], [0, 7, 3]]
)  # fmt: skip


@pytest.fixture(scope="module")
def ctx() -> Iterator[moderngl.Context]:
    context = gl_context()
    yield context
    context.release()


def rotation(ax: float, ay: float) -> np.ndarray:
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    return rx @ ry


def box(center: tuple[float, float, float], half: float, ax: float = 0.0, ay: float = 0.0) -> np.ndarray:
    corners = np.array([[x, y, z] for z in (-1, 1) for x, y in ((-1, -1), (1, -1), (1, 1), (-1, 1))], float)
    return corners * half @ rotation(ax, ay).T + np.asarray(center)


def sphere(n: int = 600, radius: float = 0.5, z: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """A closed, outward-wound sphere (Fibonacci points, convex hull)."""
    i = np.arange(n) + 0.5
    polar, azimuth = np.arccos(1 - 2 * i / n), np.pi * (1 + 5**0.5) * i
    pts = np.stack([np.sin(polar) * np.cos(azimuth), np.sin(polar) * np.sin(azimuth), np.cos(polar)], axis=1)
    faces = ConvexHull(pts).simplices
    tri = pts[faces]
    inward = np.einsum("ij,ij->i", np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), tri.mean(axis=1)) < 0
    faces[inward] = faces[inward][:, ::-1]
    return pts * radius + (0.0, 0.0, z), faces


def quad(normal_angle: float, z: float = 2.0, half: float = 0.3) -> np.ndarray:
    """A square facing the camera, turned about the vertical axis by normal_angle."""
    pts = np.array([[-1, -1, 0], [1, -1, 0], [1, 1, 0], [-1, 1, 0]], float) * half
    return pts @ rotation(0.0, normal_angle).T + (0.0, 0.0, z)


QUAD_FACES = np.array([[0, 1, 2], [0, 2, 3]])


def test_silhouette_matches_projection(ctx: moderngl.Context) -> None:
    verts = box((0.25, -0.3, 2.5), 0.35, ax=0.5, ay=0.7)
    with MeshRasterizer(BOX_FACES, SIZE, ctx=ctx) as renderer:
        img = renderer.render(verts, K)
    assert img.shape == (SIZE, SIZE, 3) and img.dtype == np.uint8
    mask = img.max(axis=2) > 0
    rows, cols = np.nonzero(mask)
    uv = project(verts, K)
    assert abs(cols.min() - uv[:, 0].min()) <= 1.5 and abs(cols.max() + 1 - uv[:, 0].max()) <= 1.5
    assert abs(rows.min() - uv[:, 1].min()) <= 1.5 and abs(rows.max() + 1 - uv[:, 1].max()) <= 1.5
    hull = ConvexHull(uv)  # a convex solid's silhouette is the hull of its projected corners
    assert abs(mask.sum() - hull.volume) <= hull.area  # at most one pixel wrong along the outline
    # Sub-pixel agreement (pixel centres at +0.5): the silhouette's centroid is the projected polygon's centroid.
    x, y = uv[hull.vertices, 0], uv[hull.vertices, 1]
    cross = x * np.roll(y, -1) - np.roll(x, -1) * y
    centroid = np.array([((x + np.roll(x, -1)) * cross).sum(), ((y + np.roll(y, -1)) * cross).sum()])
    centroid /= 3 * cross.sum()
    np.testing.assert_allclose([cols.mean() + 0.5, rows.mean() + 0.5], centroid, atol=0.2)
    lit = img[img[..., 1] > 40].astype(float)
    assert len(lit) > 100
    np.testing.assert_allclose(lit / lit[:, 1:2], np.broadcast_to(np.array(MESH_COLOR) / MESH_COLOR[1], lit.shape),
                               atol=0.03)  # fmt: skip


def test_project_convention() -> None:
    uv = project(np.array([[0.0, 0.0, 2.0], [0.2, -0.1, 1.0], [0.0, 0.0, -1.0]]), K)
    np.testing.assert_allclose(uv[:2], [[60.3, 70.7], [90.3, 53.7]])
    assert np.isnan(uv[2]).all()


def test_deterministic_across_calls_and_instances(ctx: moderngl.Context) -> None:
    verts, faces = sphere()
    frames = np.stack([verts, verts + (0.05, 0.0, 0.3)])
    with MeshRasterizer(faces, SIZE, ctx=ctx) as first:
        a, b = first.render(verts, K), first.render(verts, K)
        batch = first.render_batch(frames, K)
    with MeshRasterizer(faces, SIZE) as second:  # its own context
        c = second.render(verts, K)
    assert a.tobytes() == b.tobytes() == c.tobytes()
    assert batch[0].tobytes() == a.tobytes() and batch[1].tobytes() != a.tobytes()


def test_lighting_face_on_brighter_than_grazing_and_two_sided(ctx: moderngl.Context) -> None:
    with MeshRasterizer(QUAD_FACES, SIZE, ctx=ctx) as renderer:
        face_on = renderer.render(quad(0.0), K)
        grazing = renderer.render(quad(np.radians(75)), K)
        flipped = MeshRasterizer(QUAD_FACES[:, ::-1], SIZE, ctx=ctx)
        assert flipped.render(quad(0.0), K).tobytes() == face_on.tobytes()  # winding does not matter
        flipped.release()
    centre = face_on[int(K[1, 2]), int(K[0, 2])].astype(float)
    # ambient 0.3 + 0.7 * cos(angle between the view axis and the default light, a little above the camera)
    expected = 255 * np.array(MESH_COLOR) * (0.3 + 0.7 / np.hypot(1.0, 0.3))
    np.testing.assert_allclose(centre, expected, atol=1.5)
    assert centre[2] > centre[1] > centre[0]
    assert grazing[grazing.max(axis=2) > 0, 1].mean() < 0.6 * centre[1]

    verts, faces = sphere()
    with MeshRasterizer(faces, SIZE, ctx=ctx) as renderer:
        img = renderer.render(verts, K)[..., 1].astype(float)
    cy = int(K[1, 2])
    assert img[cy - 25 : cy - 5].mean() > img[cy + 5 : cy + 25].mean()  # light from above: y is down


def test_inside_of_open_mesh_is_lit(ctx: moderngl.Context) -> None:
    verts, faces = sphere()
    # Keep the far half only: the camera looks into a bowl and sees its inner (back) faces.
    faces = faces[(verts[faces][..., 2] > 2.0).all(axis=1)]
    with MeshRasterizer(faces, SIZE, ctx=ctx) as renderer:
        img = renderer.render(verts, K)
    centre = img[int(K[1, 2]), int(K[0, 2])]
    assert centre[1] > 0.5 * 255 * MESH_COLOR[1]  # well above ambient


def test_degenerate_faces_and_unreferenced_vertices(ctx: moderngl.Context) -> None:
    verts = box((0.0, 0.0, 2.0), 0.3, ax=0.3, ay=0.4)
    with MeshRasterizer(BOX_FACES, SIZE, ctx=ctx) as renderer:
        plain = renderer.render(verts, K)
    line = np.array([[0.0, 0.0, 1.5], [0.1, 0.1, 1.5], [0.2, 0.2, 1.5]])  # a zero-area triangle, in view
    stray = np.array([[0.0, 0.0, 1.0], [5.0, -3.0, -2.0]])  # referenced by no face (beyond the highest index too)
    extended = np.concatenate([verts, line, stray])
    faces = np.concatenate([BOX_FACES, [[3, 3, 3], [8, 9, 10], [0, 0, 5], [4, 4, 4]]])
    with MeshRasterizer(faces, SIZE, ctx=ctx) as renderer:
        img = renderer.render(extended, K)
        assert np.isfinite(renderer._normals(extended.astype(np.float32))).all()
    assert img.tobytes() == plain.tobytes()


def test_nothing_behind_the_camera_and_depth_test(ctx: moderngl.Context) -> None:
    front = box((0.0, 0.0, 2.0), 0.2)
    behind = box((0.0, 0.0, -2.0), 0.6)  # would mirror into the image if not clipped
    with MeshRasterizer(BOX_FACES, SIZE, ctx=ctx) as renderer:
        assert renderer.render(behind, K).max() == 0
        only_front = renderer.render(front, K)
    with MeshRasterizer(np.concatenate([BOX_FACES + 8, BOX_FACES]), SIZE, ctx=ctx) as renderer:
        assert renderer.render(np.concatenate([front, behind]), K).tobytes() == only_front.tobytes()

    near, far = quad(0.0, z=2.0, half=0.2), quad(np.radians(70), z=3.0, half=0.8)
    both = np.concatenate([near, far])
    for faces in (np.concatenate([QUAD_FACES, QUAD_FACES + 4]), np.concatenate([QUAD_FACES + 4, QUAD_FACES])):
        with MeshRasterizer(faces, SIZE, ctx=ctx) as renderer:  # the nearer surface wins whatever the draw order
            img = renderer.render(both, K)
        with MeshRasterizer(QUAD_FACES, SIZE, ctx=ctx) as renderer:
            alone = renderer.render(near, K)
        assert (img[alone.max(axis=2) > 0] == alone[alone.max(axis=2) > 0]).all()


def test_unavailable_names_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise Exception("libEGL.so.1 not loaded")

    monkeypatch.setattr(moderngl, "create_standalone_context", broken)
    with pytest.raises(RasterizerUnavailable) as info:
        MeshRasterizer(BOX_FACES, SIZE)
    message = str(info.value)
    assert "\n" not in message and "libEGL.so.1 not loaded" in message
    for package in ("libegl1", "libegl-mesa0", "libgl1-mesa-dri"):
        assert package in message.split()
    assert isinstance(info.value, RuntimeError)


def test_vertex_colours_colour_each_vertex(ctx: moderngl.Context) -> None:
    verts = box((0.1, -0.05, 3.0), 0.4, ax=0.3, ay=0.5)
    colours = np.zeros((8, 3), np.float32)
    colours[:, 0] = 1.0  # all red: the shading is the uniform colour's, the hue the vertices'
    with (MeshRasterizer(BOX_FACES, SIZE, ctx=ctx, ambient=1.0, color=(1.0, 0.0, 0.0)) as plain,
          MeshRasterizer(BOX_FACES, SIZE, ctx=ctx, ambient=1.0, vertex_colors=colours) as coloured):
        a, b = plain.render(verts, K), coloured.render(verts, K)
    assert (a > 0).any() and np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert (b[..., 1:] == 0).all()
    # each vertex its own colour: green grows with the vertex's x on screen, so left of the box is less green
    uv = project(verts, K)
    colours = np.zeros((8, 3), np.float32)
    colours[:, 1] = (uv[:, 0] - uv[:, 0].min()) / np.ptp(uv[:, 0])
    with MeshRasterizer(BOX_FACES, SIZE, ctx=ctx, ambient=1.0, vertex_colors=colours) as graded:
        g = graded.render(verts, K)[..., 1].astype(float)
    cols = np.nonzero((a > 0).any(-1).any(0))[0]
    mid = (cols.min() + cols.max()) // 2
    inside = (a > 0).any(-1)
    assert g[:, :mid][inside[:, :mid]].mean() + 60 < g[:, mid:][inside[:, mid:]].mean()
    with pytest.raises(ValueError, match="vertex_colors"):
        MeshRasterizer(BOX_FACES, SIZE, ctx=ctx, vertex_colors=np.zeros((5, 3)))
