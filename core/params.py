"""params.yaml: every knob, one section per stage, validated on load.

Each stage declares its own section class beside its code (tasks/stages/); the registry assembles them, with the
sections no single stage owns (below), into one model of the whole file (`params_model`). A section's values (and
their hash) go into the cache key of its stage, so only the stages whose section changed are recomputed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from core.errors import ParamsError
from core.section import Section

HEADER = ("# Every knob of the pipeline, one section per stage (docs/architecture.md). Validated on load.\n"
          "# A stage reruns when its own section changes; nothing else does.\n")


class StorageParams(Section):
    remote: str = Field(".anchor/dvc-remote", description="DVC remote: a local directory (relative to the "
                        "workspace) or a URL such as s3://bucket/anchors")
    endpoint_url: str | None = Field(None, description="an s3:// remote's endpoint, for an S3-compatible store "
                                     "other than AWS (empty = AWS); credentials come from the AWS environment")
    lock_wait_s: float = Field(3600.0, ge=0, description="how long a run waits for another run writing the same "
                               "artifact before it stops with a message (0 = stop at once)")


class ExecutionParams(Section):
    engine: Literal["threads", "dask"] = Field("threads", description="where stage tasks run: threads of this "
                                               "process, or Dask workers through prefect-dask")
    threads: int | None = Field(None, ge=1, le=256, description="threads engine: most stage tasks at once "
                                "(empty = Prefect's default)")
    dask_address: str | None = Field(None, description="dask engine: a running scheduler (tcp://host:8786); empty = "
                                     "a local cluster for the run")
    dask_workers: int = Field(2, ge=1, le=256, description="dask engine: worker processes of the local cluster")
    limits: dict[str, int] = Field({"cpu": 2}, description="most tasks at once per resource tag (Prefect tag "
                                   "concurrency limits anchor-<tag>; gpu left out = one per visible GPU, at least "
                                   "one; another tag left out has none)")
    device: str = Field("auto", description="where models compute: auto (CUDA when there is a GPU), cpu, cuda (each "
                        "heavy task takes a free GPU of its own) or cuda:N")
    max_latent_mb: int = Field(2048, ge=0, description="a render keeps its latent video in memory up to this size, "
                               "beyond it in a scratch file beside the render (any length in bounded memory)")
    retries: int = Field(2, ge=0, le=20, description="retries of a stage that failed on a transient I/O error")
    retry_delay_s: float = Field(2.0, ge=0, le=3600, description="seconds between those retries")

    @model_validator(mode="after")
    def _limits(self) -> ExecutionParams:
        bad = [k for k, v in self.limits.items() if v < 1 or not k.replace("-", "").isalnum()]
        if bad:
            raise ValueError(f"limits: tag names are letters, digits and '-', limits >= 1 (bad: {', '.join(bad)})")
        kind, _, index = self.device.partition(":")
        if kind not in ("auto", "cpu", "cuda") or (index and (kind != "cuda" or not index.isdigit())):
            raise ValueError(f"device {self.device!r}: choose auto, cpu, cuda or cuda:N")
        return self


class BodyModelParams(Section):
    path: str | None = Field(None, description="real SMPL-X files (SMPLX_NEUTRAL.npz/.pkl, or a folder holding "
                             "one); empty = the license-free mannequin the project generates")


class ModelsParams(Section):
    sd15: str | None = Field(None, description="local Stable Diffusion 1.5 folder (unet/, vae/, scheduler/); "
                             "profile sd15 only")
    sd15_inpaint: str | None = Field(None, description="local SD 1.5 inpainting folder (unet/ with 9 inputs)")
    image_encoder: str | None = Field(None, description="local CLIP vision encoder folder (transformers)")
    motion_adapter: str | None = Field(None, description="local AnimateDiff motion adapter folder (diffusers)")


class ServiceParams(Section):
    host: str = Field("127.0.0.1", description="`anchor serve`: the address the HTTP API binds (beyond loopback "
                      "only with tokens)")
    port: int = Field(7860, ge=1, le=65535, description="`anchor serve`: its port (outside 8000–8999, where an "
                      "embedded Prefect server picks its own)")
    tokens_file: str | None = Field(None, description="a file of bearer tokens, one per line, accepted besides "
                                    "$ANCHOR_API_TOKENS (comma-separated); with none, only loopback is served")
    max_upload_mb: int = Field(1024, ge=1, le=1_000_000, description="largest request body (video, audio or "
                               "motion upload) the API accepts; larger ones are refused before they are read")
    poll_s: float = Field(2.0, gt=0, le=60, description="how often `anchor serve` (or `anchor worker`) looks for new "
                          "jobs to run")
    pool: str | None = Field(None, description="a Prefect work pool: `anchor serve` hands its jobs and schedules to "
                             "the pool's workers (`anchor worker --pool`) instead of running them itself; needs a "
                             "Prefect server every machine reaches ($PREFECT_API_URL)")


# Sections no single stage owns; `storage` and `execution` head the file, the others sit before the first stage
# that reads them.
COMMON: dict[str, type[Section]] = {"storage": StorageParams, "execution": ExecutionParams,
                                    "body_model": BodyModelParams, "models": ModelsParams, "service": ServiceParams}
HEAD = ("storage", "execution")


class Params(BaseModel):
    """The whole params.yaml. The registry's model (`params_model`) adds one field per section."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    profile: Literal["tiny", "cpu", "sd15"] = Field("cpu", description="model profile: cpu learns one person "
                                                    "from scratch on a laptop CPU; sd15 needs local SD 1.5 "
                                                    "weights and a GPU; tiny proves the plumbing in seconds")

    def section(self, name: str) -> Section:
        value = getattr(self, name, None)
        if not isinstance(value, Section):
            raise KeyError(name)
        return value


def params_model(sections: list[tuple[str, type[Section]]]) -> type[Params]:
    """The model of the whole file from its sections in file order (each validated by its own class)."""
    fields: dict[str, Any] = {name: (cls, cls()) for name, cls in sections}
    return create_model("Params", __base__=Params, **fields)


def _field_names(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            break
        model = field.annotation
    return sorted(model.model_fields)


def _one_line(err: ValidationError, source: str, model: type[Params]) -> str:
    e = err.errors()[0]
    loc = tuple(e["loc"])
    key = ".".join(str(p) for p in loc) or "(top level)"
    value = e.get("input")
    if e["type"] == "extra_forbidden":
        allowed = ", ".join(_field_names(model, loc[:-1]))
        return f"{source}: unknown key {key} (= {value!r}); allowed here: {allowed}"
    msg = e["msg"].removeprefix("Value error, ")
    if isinstance(value, dict):
        return f"{source}: {key}: {msg}"
    return f"{source}: {key} = {value!r}: {msg}"


def parse_params(data: Any, model: type[Params], source: str = "params.yaml") -> Params:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ParamsError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ParamsError(_one_line(err, source, model)) from None


def load_params(path: Path, model: type[Params]) -> Params:
    if not path.is_file():
        raise ParamsError(f"{path}: not found (run `anchor init` to create a workspace)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "cannot be parsed"
        raise ParamsError(f"{path.name}: not valid YAML{where}: {problem}") from None
    return parse_params(data, model, path.name)


def default_params_yaml(model: type[Params]) -> str:
    """params.yaml with every default and its description, as `anchor init` writes it."""
    lines = [*HEADER.splitlines(), ""]
    defaults = model()
    for name, field in model.model_fields.items():
        value = getattr(defaults, name)
        if isinstance(value, Section):
            lines.append(f"{name}:")
            for sub, sfield in type(value).model_fields.items():
                dumped = yaml.safe_dump({sub: getattr(value, sub)}, default_flow_style=True, width=10_000)
                text = dumped.strip()[1:-1]
                comment = f"  # {sfield.description}" if sfield.description else ""
                lines.append(f"  {text}{comment}")
        else:
            comment = f"  # {field.description}" if field.description else ""
            lines.append(f"{name}: {value}{comment}")
        lines.append("")
    return "\n".join(lines)
