"""Training recipes: a typed schema, dotted command-line overrides and the DeepSpeed config.

A recipe is a YAML file validated by pydantic; every error becomes one HarnessError line that
names the field and the file. Batch arithmetic (gradient accumulation from the world size,
epochs -> steps) lives here so that `--dry-run`, `--print-recipe` and the trainer agree.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from harness.data.shards import expand_pattern, is_url, source_urls
from harness.errors import HarnessError
from harness.precision import Precision


class _Section(BaseModel):
    # Unknown keys are typos (e.g. `optim.learning_rate`): refuse them instead of ignoring them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelCfg(_Section):
    name: str = "mimo-unet-plus"
    overrides: dict[str, Any] = Field(default_factory=dict)


class DataCfg(_Section):
    train: str
    # Selection (best checkpoint, ASHA, the tune metric) reads `val` only; `test` is scored at the
    # end of training (and every eval.test_every steps if set) and reported, never used to choose.
    val: str | None = None
    test: str | None = None
    crop: int = Field(256, gt=0, multiple_of=4)
    crops_per_image: int = Field(1, ge=1)
    workers: int = Field(2, ge=0)
    augment: bool = True  # random horizontal flip, as in the paper


class LossCfg(_Section):
    fft_weight: float = Field(0.1, ge=0)
    scale_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)


class OptimCfg(_Section):
    name: Literal["adam", "adamw"] = "adam"
    lr: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    # torch's Adam kernels: "foreach" (multi-tensor), "fused" (one kernel; CUDA and CPU), "loop" (per tensor).
    impl: Literal["foreach", "fused", "loop"] = "foreach"


class ScheduleCfg(_Section):
    name: Literal["multistep", "cosine", "constant"] = "constant"
    unit: Literal["steps", "epochs"] = "steps"  # unit of `milestones` and `warmup`
    milestones: list[float] = Field(default_factory=list)
    gamma: float = Field(0.5, gt=0)
    warmup: float = Field(0, ge=0)  # linear warmup length (cosine/constant)
    min_lr: float = Field(0.0, ge=0)  # cosine floor


class TrainCfg(_Section):
    global_batch: int = Field(4, ge=1)
    # Per-rank batch; None = global_batch / world_size (no accumulation).
    micro_batch: int | None = Field(None, ge=1)
    steps: int | None = Field(None, ge=1)
    epochs: float | None = Field(None, gt=0)
    # Training pairs per epoch; None = read the count from the train shards' manifest.
    epoch_size: int | None = Field(None, ge=1)
    precision: Precision = "fp32"
    # ZeRO 1/2 only: their overflow check is what skips a non-finite step on every rank, and
    # stage 3 would partition the weights that EMA and validation read.
    zero_stage: Literal[1, 2] = 1
    grad_clip: float = Field(0.0, ge=0)  # 0 = off (the paper does not clip)
    ema_decay: float | None = Field(None, gt=0, lt=1)
    seed: int = 0
    max_nonfinite: int = Field(20, ge=1)  # abort after this many non-finite steps in a row
    threads: int | None = Field(None, ge=1)  # torch intra-op threads per rank (None: cores / local ranks)
    log_every: int = Field(10, ge=1)  # steps between log.jsonl records
    # info: the harness's own lines (scores, end-of-run block, tracking); verbose: library logs too
    log_level: Literal["info", "verbose"] = "info"
    # Speed switches (benchmarks/README.md has the numbers): NHWC (channels_last) activations, and
    # torch.compile of the model (minutes of compilation up front; pays off on long GPU runs).
    channels_last: bool = False
    compile: bool = False

    @model_validator(mode="after")
    def _one_length(self) -> TrainCfg:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of train.steps and train.epochs")
        return self


class EvalCfg(_Section):
    every: int = Field(1000, ge=1)
    max_images: int | None = Field(None, ge=1)
    # true = "rot4" (MIMO-UNet++ as published: 4 rotations averaged); "d8" = 8 flips x rotations.
    ensemble: bool | Literal["rot4", "d8"] = False
    # The paper scores in fp32 whatever the training precision; bf16 is faster and labelled as such.
    precision: Literal["fp32", "bf16"] = "fp32"
    batch: int = Field(1, ge=1)  # equal-size frames per validation forward
    test_every: int | None = Field(None, ge=1)  # also score data.test every N steps (None: at the end only)
    images: int = Field(2, ge=0)  # triptychs sent to tracking at image-logging validations


class CheckpointCfg(_Section):
    every: int = Field(1000, ge=1)
    keep: int = Field(3, ge=1)


class TrackingCfg(_Section):
    enabled: bool = False
    tracking_uri: str | None = None
    experiment: str = "mimo-harness"
    run_name: str | None = None
    registered_model: str | None = None
    log_every: int = Field(10, ge=1)
    images_every: int = Field(1, ge=1)  # every N-th validation logs triptychs
    system_metrics: bool = False
    # The MLflow run this run nests under (a tune experiment's parent run), and extra run tags.
    parent_run_id: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)


class Recipe(_Section):
    name: str | None = None
    model: ModelCfg = Field(default_factory=ModelCfg)
    data: DataCfg
    loss: LossCfg = Field(default_factory=LossCfg)
    optim: OptimCfg = Field(default_factory=OptimCfg)
    schedule: ScheduleCfg = Field(default_factory=ScheduleCfg)
    train: TrainCfg
    eval: EvalCfg = Field(default_factory=EvalCfg)
    checkpoint: CheckpointCfg = Field(default_factory=CheckpointCfg)
    tracking: TrackingCfg = Field(default_factory=TrackingCfg)
    # Merged verbatim over the generated DeepSpeed config (experts only).
    deepspeed: dict[str, Any] = Field(default_factory=dict)
    # Where the recipe came from (set by load_recipe; named in error messages, never dumped).
    _source: str = PrivateAttr("<recipe>")

    @property
    def source(self) -> str:
        return self._source


# ----------------------------------------------------------------------------- loading


def read_yaml_mapping(path: Path, what: str) -> dict:
    """A YAML file whose top level is a mapping (a recipe, a tune recipe), or one HarnessError."""
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise HarnessError(f"{path}: no such {what} file") from None
    except (OSError, yaml.YAMLError) as exc:
        raise HarnessError(f"{path}: not a readable YAML {what} ({_first_line(exc)})") from None
    if not isinstance(raw, dict):
        raise HarnessError(f"{path}: expected a mapping at the top level of the {what}")
    return raw


def load_recipe(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe; data paths are resolved against the recipe or CWD.

    A recipe may be `base: other.yaml` + `overrides: [key.path=value, ...]` (+ `name:`), the
    form tune recipes use: the base (itself possibly based on another) with those overrides."""
    path = Path(path)
    raw = apply_overrides(_read_with_base(path), overrides, path)
    raw.setdefault("name", path.stem)
    recipe = recipe_from_dict(raw, str(path))
    _resolve_data_paths(recipe, path.parent)
    return recipe


BASE_KEYS = {"base", "overrides", "name"}  # what a recipe with `base:` may hold


def _read_with_base(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    raw = read_yaml_mapping(path, "recipe")
    if "base" not in raw:
        return raw
    if path.resolve() in seen:
        raise HarnessError(f"{path}: base: {raw['base']} leads back to {path.name} (a cycle of bases)")
    extra = sorted(set(raw) - BASE_KEYS, key=str)
    if extra:
        raise HarnessError(f"{path}: {extra[0]}: a recipe with `base:` holds only base, overrides and name "
                           "(write changes as overrides: [key.path=value, ...])")
    merged = _read_with_base(path.parent / str(raw["base"]), (*seen, path.resolve()))
    merged.pop("name", None)  # the derived recipe is named after its own file unless it says
    if "name" in raw:
        merged["name"] = raw["name"]
    return apply_overrides(merged, override_list(raw.get("overrides") or [], path), path)


def override_list(value: Any, path: Path | str) -> list[str]:
    """The `overrides:` of a recipe with `base:` (training or tune): a list of key.path=value strings."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise HarnessError(f"{path}: overrides: expected a list of 'key.path=value' strings")
    return value


def recipe_from_dict(raw: dict, source: str = "<recipe>") -> Recipe:
    """Validate a plain dict (e.g. one stored in a checkpoint or built by Ray Tune)."""
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        raise HarnessError(f"{source}: {error_line(exc)}") from None
    recipe._source = source
    return recipe


UNION_TAGS = {"distribution", "constant", "elements"}  # tags of tagged unions: not part of a field's path


def error_line(exc: ValidationError, prefix: str = "", *, with_input: bool = False) -> str:
    """The first error of a pydantic validation as `field.path: what is wrong` (one line);
    `with_input` names the value given for a choice (`'hyperband', expected 'asha' or 'none'`)."""
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err["loc"] if p not in UNION_TAGS)
    field = f"{prefix}.{field}" if prefix and field else (prefix or field or "(top level)")
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field"
    elif err["type"] == "literal_error" and with_input:
        msg = f"{err['input']!r}, {msg.replace('Input should be', 'expected')}"
    return f"{field}: {msg}"


def apply_overrides(raw: dict, overrides, source: Path | str = "<recipe>") -> dict:
    """Apply `a.b.c=value` overrides (values parsed as YAML) to a copy of `raw`."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise HarnessError(f"override {item!r}: expected key.path=value")
        parts = key.split(".")
        node = raw
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise HarnessError(f"override {item!r}: {part} in {source} is not a section")
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise HarnessError(f"override {item!r}: value is not valid YAML") from None
    return raw


def dump_recipe(recipe: Recipe) -> str:
    """YAML of the resolved recipe (what is stored with a run)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


# Fields a resumed run may change (prefixes end with "."): its length, how often it evaluates,
# checkpoints and logs, and how it runs (workers, threads, compile, tracking). Everything else
# (model, loss, optimizer, schedule shape, data, crop, batch, precision, seed, deepspeed...)
# defines what the weights are trained on or with, and refuses a resume.
RESUME_MAY_CHANGE = (
    "name", "train.steps", "train.epochs", "train.micro_batch", "train.log_every", "train.log_level", "train.threads",
    "train.max_nonfinite", "train.compile", "eval.every", "eval.images", "eval.test_every",
    # how numbers are scored and reported, not what the weights are trained on
    "eval.precision", "eval.ensemble", "eval.batch", "data.test",
    "checkpoint.", "data.workers", "tracking.",
)


def recipe_changes(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """(refused, allowed) changes from recipe dict `old` to `new`, each as `field: old -> new`."""
    refused, allowed = [], []
    for key, before, after in _differences(old, new):
        mutable = any(key == f or (f.endswith(".") and key.startswith(f)) for f in RESUME_MAY_CHANGE)
        (allowed if mutable else refused).append(f"{key}: {before!r} -> {after!r}")
    return refused, allowed


def _differences(old, new, prefix: str = ""):
    """(dotted key, old, new) for every leaf that differs; sections are compared key by key."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            yield from _differences(old.get(key), new.get(key), f"{prefix}{key}.")
    elif old != new and (old, new) not in ((None, {}), ({}, None)):
        yield prefix.rstrip("."), old, new


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__


# ----------------------------------------------------------------------------- data paths


DATA_FIELDS = ("train", "val", "test")


def _resolve_data_paths(recipe: Recipe, recipe_dir: Path) -> None:
    for field in DATA_FIELDS:
        value = getattr(recipe.data, field)
        if value is None or is_url(value) or Path(value).is_absolute():
            continue
        beside = recipe_dir / value
        # Relative to the recipe file first (recipes ship with their data), then the CWD.
        chosen = beside if _local_exists(str(beside)) or not _local_exists(value) else Path(value)
        setattr(recipe.data, field, os.path.normpath(chosen.absolute()))


def _local_exists(source: str) -> bool:
    return all(Path(p).exists() for p in expand_pattern(source))


def check_data(recipe: Recipe) -> None:
    """One-line error when a train/val/test shard directory, manifest or shard file is missing."""
    for field in DATA_FIELDS:
        value = getattr(recipe.data, field)
        if value is None or is_url(value):
            continue
        paths = [Path(p) for p in expand_pattern(value)]
        if len(paths) == 1 and paths[0].is_dir():
            paths = _manifest_shards(recipe, field, paths[0])
        missing = [p for p in paths if not p.is_file()]
        if len(paths) == 1 and missing and not value.endswith(".tar"):
            raise HarnessError(f"{recipe.source}: data.{field}: {value} does not exist "
                               "(expected a shard directory with manifest.json or a .tar pattern)")
        if missing:
            raise HarnessError(f"{recipe.source}: data.{field}: shard {missing[0]} does not exist"
                               + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))


def _manifest_shards(recipe: Recipe, field: str, directory: Path) -> list[Path]:
    try:
        return [Path(u) for u in source_urls(directory)[0]]
    except HarnessError as exc:
        raise HarnessError(f"{recipe.source}: data.{field}: {exc}") from None


def dataset_size(source: str) -> int | None:
    """Number of training pairs recorded in a shard directory's manifest, if it has one."""
    if is_url(source) or not Path(source).is_dir():
        return None
    from harness.data import shards

    return int(shards.load_manifest(source)["total_samples"]) or None


# ----------------------------------------------------------------------------- batch arithmetic


def batch_split(recipe: Recipe, world_size: int) -> tuple[int, int]:
    """(micro batch per rank, gradient accumulation steps) that keep the global batch fixed."""
    t = recipe.train
    micro = t.micro_batch or t.global_batch // world_size
    if micro < 1 or t.global_batch % (micro * world_size):
        raise HarnessError(
            f"{recipe.source}: train.global_batch: {t.global_batch} is not divisible by "
            f"train.micro_batch ({micro}) x world size ({world_size})")
    return micro, t.global_batch // (micro * world_size)


def steps_per_epoch(recipe: Recipe) -> float:
    """Optimizer steps per epoch (pairs / global batch); needs train.epoch_size or a manifest."""
    size = recipe.train.epoch_size or dataset_size(recipe.data.train)
    if not size:
        raise HarnessError(f"{recipe.source}: train.epoch_size: needed to convert epochs to steps "
                           f"(no manifest with a sample count at {recipe.data.train})")
    return size / recipe.train.global_batch


def total_steps(recipe: Recipe) -> int:
    if recipe.train.steps is not None:
        return recipe.train.steps
    return max(1, round(recipe.train.epochs * steps_per_epoch(recipe)))


def to_steps(recipe: Recipe, value: float) -> int:
    """A schedule length in the recipe's unit (steps or epochs) as optimizer steps."""
    if recipe.schedule.unit == "steps":
        return int(value)
    return round(value * steps_per_epoch(recipe))


def lr_factor_fn(recipe: Recipe):
    """step -> LR multiplier for torch's LambdaLR (a plain closure: not pickled into checkpoints)."""
    s = recipe.schedule
    total = total_steps(recipe)
    warmup = to_steps(recipe, s.warmup)
    milestones = sorted(to_steps(recipe, m) for m in s.milestones)
    floor = s.min_lr / recipe.optim.lr

    def factor(step: int) -> float:
        if s.name == "multistep":
            return s.gamma ** sum(step >= m for m in milestones)
        if step < warmup:
            return (step + 1) / warmup
        if s.name == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


# ----------------------------------------------------------------------------- DeepSpeed config


def deepspeed_config(recipe: Recipe, world_size: int) -> dict:
    """The DeepSpeed config for this recipe and world size (optimizer/scheduler are torch objects)."""
    from harness.precision import deepspeed_precision

    micro, accum = batch_split(recipe, world_size)
    config = {
        "train_batch_size": recipe.train.global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": recipe.train.grad_clip,
        "zero_optimization": {"stage": recipe.train.zero_stage},
        # Our torch Adam/AdamW is passed to deepspeed.initialize: avoids the fused-Adam JIT build.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
        **deepspeed_precision(recipe.train.precision),
    }
    return _merge(config, recipe.deepspeed)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out
