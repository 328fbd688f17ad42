"""The tune recipe: `base:` (a training recipe) + `overrides:` + `search:`, validated by pydantic
with one-line, field-named errors like training recipes, then checked value by value against the
trainer's own recipe schema, all before Ray starts. `TuneSpec` is what the driver and every trial
use; it is stored as `<exp>/tune_spec.json` for `--resume`."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from harness.errors import HarnessError
from harness.recipe import (
    Recipe,
    apply_overrides,
    error_line,
    load_recipe,
    override_list,
    read_yaml_mapping,
    recipe_from_dict,
    total_steps,
)

METRICS = ("val_psnr", "val_ssim")
TRIAL_TAG = "mimo.tune.trial_id"  # on each trial's MLflow run
EXPERIMENT_TAG = "mimo.tune.experiment"
DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice", "grid")

# ----------------------------------------------------------------------------- the search section


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Distribution(_Strict):
    """One sampled value: exactly one of the distributions, optionally active only `when` choice
    params hold given values (`when: {schedule.name: multistep}`)."""

    uniform: list[float] | None = None
    loguniform: list[float] | None = None
    randint: list[float] | None = None
    choice: list[Any] | None = Field(None, min_length=1)
    grid: list[Any] | None = Field(None, min_length=1)
    when: dict[str, Any] = Field(default_factory=dict)

    @field_validator("uniform", "loguniform", "randint")
    @classmethod
    def _bounds(cls, values: list[float] | None, info) -> list[float] | None:
        if values is None:
            return None
        if len(values) != 2:
            raise ValueError(f"expected [low, high], got {values!r}")
        low, high = values
        if not low < high:
            raise ValueError(f"bounds [{low:g}, {high:g}]: low must be below high")
        if info.field_name == "loguniform" and low <= 0:
            raise ValueError(f"bounds [{low:g}, {high:g}]: loguniform needs low > 0")
        if info.field_name == "randint" and not all(float(v).is_integer() for v in values):
            raise ValueError(f"bounds [{low:g}, {high:g}]: randint needs integers")
        return values

    @model_validator(mode="after")
    def _exactly_one(self) -> Distribution:
        if len(self.kinds()) != 1:
            raise ValueError(f"expected exactly one of {', '.join(DISTRIBUTIONS)}")
        return self

    def kinds(self) -> list[str]:
        return [k for k in DISTRIBUTIONS if getattr(self, k) is not None]


def _entry_kind(value: Any) -> str:
    return "distribution" if isinstance(value, dict) else "constant"


# A list field (scale weights, betas) samples some elements and keeps the others constant.
Element = Annotated[Annotated[Distribution, Tag("distribution")] | Annotated[Any, Tag("constant")],
                    Discriminator(_entry_kind)]
SpaceEntry = Annotated[Annotated[Distribution, Tag("distribution")] | Annotated[list[Element], Tag("elements")],
                       Discriminator(lambda v: "elements" if isinstance(v, list) else "distribution")]


class Scheduler(_Strict):
    name: Literal["asha", "none"] = "asha"
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, ge=1.01)


class Resources(_Strict):
    cpus: float = Field(1.0, ge=0.01)
    gpus: float = Field(0.0, ge=0.0)
    workers: int = Field(1, ge=1)


class SearchCfg(_Strict):
    name: str | None = None
    storage_path: str | None = None
    metric: Literal["val_psnr", "val_ssim"] = "val_psnr"
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(4, ge=1)
    max_concurrent: int = Field(2, ge=1)
    search_alg: Literal["random", "grid", "optuna"] = "random"
    seed: int = Field(0, ge=0)
    scheduler: Scheduler = Field(default_factory=Scheduler)
    resources: Resources = Field(default_factory=Resources)
    space: dict[str, SpaceEntry] = Field(min_length=1)

    @field_validator("scheduler", mode="before")
    @classmethod
    def _scheduler_by_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value


@dataclass(frozen=True)
class Param:
    """One sampled value: `name` is its key in Tune's config (`optim.lr`, `loss.scale_weights.1`)."""

    name: str
    field: str  # the recipe field it sets (`loss.scale_weights`)
    index: int | None  # element of a list field, else None
    kind: str  # one of DISTRIBUTIONS
    values: tuple  # (low, high) or the choices
    when: tuple[tuple[str, tuple], ...] = ()  # active only when these params hold these values

    def active(self, config: dict) -> bool:
        return all(config.get(key) in allowed for key, allowed in self.when)

@dataclass
class TuneSpec:
    """A loaded tune recipe: everything the driver and the trials need (stored as tune_spec.json)."""

    source: str
    base: dict  # the resolved base training recipe (absolute data paths)
    params: list[Param]
    lists: dict[str, list]  # list fields: constants with None where a Param samples the element
    name: str
    storage_path: str
    metric: str = "val_psnr"
    mode: str = "max"
    num_samples: int = 4
    max_concurrent: int = 2
    search_alg: str = "random"
    scheduler: dict = field(default_factory=lambda: {"name": "asha", "grace_period": 1, "reduction_factor": 2})
    resources: dict = field(default_factory=lambda: {"cpus": 1.0, "gpus": 0.0, "workers": 1})
    seed: int = 0
    tracking_uri: str | None = None
    parent_run_id: str | None = None
    experiment_id: str | None = None

    @property
    def exp_dir(self) -> Path:
        return Path(self.storage_path) / self.name

    @property
    def base_recipe(self) -> Recipe:
        return recipe_from_dict(self.base, self.source)

    @property
    def max_t(self) -> int:
        """Validations of a full trial: ASHA's time unit (the reported `validation` index)."""
        recipe = self.base_recipe
        total, every = total_steps(recipe), recipe.eval.every
        return total // every + (total % every != 0)

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "params": [asdict(p) for p in self.params]}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> TuneSpec:
        raw = json.loads(text)
        params = [Param(p["name"], p["field"], p["index"], p["kind"], tuple(p["values"]),
                        tuple((k, tuple(v)) for k, v in p["when"])) for p in raw.pop("params")]
        return cls(params=params, **raw)

    def trial_recipe(self, config: dict, trial_id: str) -> Recipe:
        """The base recipe with this trial's sampled values (via the recipe's own override code)."""
        overrides = [f"{key}={yaml_value(value)}" for key, value in self.sampled_fields(config).items()]
        overrides += [f"name={self.name}-{trial_id}", f"tracking.run_name={self.name}-{trial_id}",
                      "tracking.registered_model=null"]  # the driver registers the best trial only
        if self.tracking_uri:
            overrides.append(f"tracking.tracking_uri={self.tracking_uri}")
        raw = apply_overrides(self.base, overrides, self.source)
        if self.parent_run_id:  # the trainer's own run nests under the experiment's parent run
            raw["tracking"] = {**raw.get("tracking", {}), "parent_run_id": self.parent_run_id,
                               "tags": {**raw.get("tracking", {}).get("tags", {}), TRIAL_TAG: trial_id,
                                        EXPERIMENT_TAG: str(self.exp_dir)}}
        return recipe_from_dict(raw, f"{self.source} (trial {trial_id})")

    def sampled_fields(self, config: dict) -> dict[str, Any]:
        """Recipe field -> value for the params active in `config` (list fields assembled)."""
        out: dict[str, Any] = {}
        for p in self.params:
            if not p.active(config) or p.name not in config:
                continue
            if p.index is None:
                out[p.field] = config[p.name]
            else:
                out.setdefault(p.field, list(self.lists[p.field]))[p.index] = config[p.name]
        for name, value in out.items():  # a list with no active element left None: use the base
            if isinstance(value, list) and None in value:
                base = _get(self.base, name)
                out[name] = [b if v is None else v for v, b in zip(value, base)]
        return out

def yaml_value(value: Any) -> str:
    """A value as YAML that reads back as itself (`1e-05` alone would read back as a string)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()

def _get(raw: dict, dotted: str) -> Any:
    node: Any = raw
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


# ----------------------------------------------------------------------------- loading a tune recipe


def load_tune_recipe(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> TuneSpec:
    """Read a tune recipe; `search.*` overrides change the search, others the base recipe.
    Every problem is one HarnessError naming the file and the key, raised before Ray starts."""
    path = Path(path)
    raw = read_yaml_mapping(path, "tune recipe")
    if "base" not in raw or "search" not in raw:
        raise HarnessError(f"{path}: expected a mapping with `base:` (training recipe) and `search:`")
    unknown = sorted(set(raw) - {"base", "overrides", "search"})
    if unknown:
        raise HarnessError(f"{path}: {unknown[0]}: unknown top-level key (expected base, overrides, search)")
    search_ov = [o for o in overrides if o.startswith("search.")]
    raw = apply_overrides(raw, search_ov, path)
    base_ov = [*override_list(raw.get("overrides") or [], path), *(o for o in overrides if o not in search_ov)]
    base = load_recipe(path.parent / str(raw["base"]), base_ov)
    try:
        search = SearchCfg.model_validate(raw["search"])
    except ValidationError as exc:
        raise HarnessError(f"{path}: {error_line(exc, 'search', with_input=True)}") from None
    if not base.data.val:
        raise HarnessError(f"{base.source}: data.val: trials report validation metrics; set a validation set")
    spec = TuneSpec(source=str(path), base=base.model_dump(mode="json"), params=[], lists={},
                    name=search.name or path.stem, storage_path=os.path.abspath(search.storage_path or "runs/tune"),
                    metric=search.metric, mode=search.mode, num_samples=search.num_samples,
                    max_concurrent=search.max_concurrent, search_alg=search.search_alg, seed=search.seed,
                    scheduler=search.scheduler.model_dump(), resources=search.resources.model_dump())
    spec.params, spec.lists = _params(search.space)
    _check_params(spec, f"{path}: search")
    return spec


def _params(space: dict[str, Any]) -> tuple[list[Param], dict[str, list]]:
    """The validated space as Params (named like Tune's config keys) and list-field constants."""
    params: list[Param] = []
    lists: dict[str, list] = {}
    for key, entry in space.items():
        if not isinstance(entry, list):
            params.append(_param(key, key, None, entry))
            continue
        lists[key] = [None if isinstance(item, Distribution) else item for item in entry]
        params += [_param(f"{key}.{i}", key, i, item) for i, item in enumerate(entry) if isinstance(item, Distribution)]
    return params, lists


def _param(name: str, fld: str, index: int | None, d: Distribution) -> Param:
    kind = d.kinds()[0]
    when = tuple((str(k), tuple(v if isinstance(v, list) else [v])) for k, v in d.when.items())
    return Param(name, fld, index, kind, tuple(getattr(d, kind)), when)


def _check_params(spec: TuneSpec, where: str) -> None:
    """Each value a param can take must make a valid recipe (unknown fields, ranges, types) and
    `when` may only name choice params; grid values need a grid/random search."""
    names = {p.name: p for p in spec.params}
    for p in spec.params:
        for key, allowed in p.when:
            cond = names.get(key)
            if cond is None or cond.kind not in ("choice", "grid"):
                raise HarnessError(f"{where}.space.{p.name}.when: {key} is not a choice/grid param of the space")
            bad = [v for v in allowed if v not in cond.values]
            if bad:
                raise HarnessError(f"{where}.space.{p.name}.when: {key}={bad[0]!r} is not one of its choices")
        if p.kind == "grid" and spec.search_alg == "optuna":
            raise HarnessError(f"{where}.space.{p.name}: grid values need search_alg grid or random, not optuna")
        for value in _probe_values(p):
            _check_value(spec, p, value, where)

def _probe_values(p: Param) -> list:
    if p.kind in ("choice", "grid"):
        return list(p.values)
    if p.kind == "randint":
        return [int(v) for v in p.values]
    return [float(v) for v in p.values]

def _check_value(spec: TuneSpec, p: Param, value: Any, where: str) -> None:
    config = {q.name: _probe_values(q)[0] for q in spec.params}
    config.update({key: allowed[0] for key, allowed in p.when})  # a config where `p` is active
    config[p.name] = value
    try:
        spec.trial_recipe(config, "check")
    except HarnessError as exc:
        reason = str(exc).removeprefix(f"{spec.source} (trial check): ")
        raise HarnessError(f"{where}.space.{p.name}: value {value!r}: {reason}") from None
