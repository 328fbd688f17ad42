"""Ray Tune over training recipes: `python -m harness.tune --recipe recipes/tune-plus.yaml [k=v ...]`.

A tune recipe names a base training recipe and a `search:` section (see recipes/tune-plus.yaml).
Every trial runs the trainer itself (`harness.train.run`): in the trial's own process for
`workers: 1`, or as a Ray Train `TorchTrainer` of `workers` ranks with DeepSpeed. Trials report
val PSNR/SSIM at each validation with a checkpoint (a pointer to the trainer's own torn-safe
checkpoint in the trial's run dir), so ASHA can stop them and `--resume EXP_DIR` (Tuner.restore)
continues an interrupted experiment from those checkpoints.

Everything that can be wrong in the recipe or the search space is checked before Ray starts.
The experiment directory `<storage_path>/<name>/` holds Tune's state, `tune_spec.json` (what
`--resume` needs), one run dir per trial under `trials/`, `results.csv` and `best_recipe.yaml`.
MLflow (when the base recipe enables tracking): one parent run for the experiment, one nested
child run per trial (the trainer's own run), the best trial's model registered with the usual
champion rule.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:
    # Run as a file (`ray submit CLUSTER.yaml harness/tune.py`, `python harness/tune.py`): drop the
    # script's directory from sys.path (harness/io.py would shadow the stdlib's io), add the repo.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    if os.path.basename(_here) == "harness":
        sys.path.insert(0, os.path.dirname(_here))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import yaml  # noqa: E402

from harness.errors import HarnessError  # noqa: E402
from harness.files import atomic_write  # noqa: E402
from harness.recipe import (  # noqa: E402
    Recipe,
    apply_overrides,
    dump_recipe,
    load_recipe,
    read_yaml_mapping,
    recipe_from_dict,
    total_steps,
)

log = logging.getLogger(__name__)

SPEC = "tune_spec.json"
RESULTS = "results.csv"
BEST_RECIPE = "best_recipe.yaml"
TRIALS = "trials"  # <exp>/trials/<trial_id>: the trainer's run dir of each trial
RUN_ID_FILE = "mlflow_run_id"  # the trial's MLflow child run, created once
POINTER = "tune_pointer.json"  # what a Tune checkpoint holds: the trainer checkpoint tag
METRICS = ("val_psnr", "val_ssim")
VALIDATION = "validation"  # reported with each result: 1, 2, ... (ASHA's time attribute)
SEARCH_ALGS = ("random", "grid", "optuna")
DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice", "grid")
SEARCH_KEYS = {"name", "storage_path", "metric", "mode", "num_samples", "max_concurrent", "search_alg",
               "scheduler", "resources", "space", "seed"}

# ----------------------------------------------------------------------------- the search spec


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
        overrides = [f"{key}={_yaml_value(value)}" for key, value in self.sampled_fields(config).items()]
        overrides += [f"name={self.name}-{trial_id}", f"tracking.run_name={self.name}-{trial_id}",
                      "tracking.registered_model=null"]  # the driver registers the best trial only
        if self.tracking_uri:
            overrides.append(f"tracking.tracking_uri={self.tracking_uri}")
        raw = apply_overrides(self.base, overrides, self.source)
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


def _yaml_value(value: Any) -> str:
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
    base_ov = [*_string_list(raw.get("overrides") or [], path), *(o for o in overrides if o not in search_ov)]
    base = load_recipe(path.parent / str(raw["base"]), base_ov)
    return _build_spec(path, base, raw["search"])


def _string_list(value, path: Path) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise HarnessError(f"{path}: overrides: expected a list of 'key.path=value' strings")
    return value


def _build_spec(path: Path, base: Recipe, search: Any) -> TuneSpec:
    where = f"{path}: search"
    if not isinstance(search, dict):
        raise HarnessError(f"{where}: expected a mapping")
    unknown = sorted(set(search) - SEARCH_KEYS)
    if unknown:
        raise HarnessError(f"{where}.{unknown[0]}: unknown key (expected one of {sorted(SEARCH_KEYS)})")
    if not base.data.val:
        raise HarnessError(f"{base.source}: data.val: trials report validation metrics; set a validation set")
    spec = TuneSpec(source=str(path), base=base.model_dump(mode="json"), params=[], lists={},
                    name=str(search.get("name") or path.stem),
                    storage_path=os.path.abspath(str(search.get("storage_path") or "runs/tune")))
    _check_settings(spec, search, where)
    spec.params, spec.lists = _parse_space(search.get("space"), where)
    _check_params(spec, where)
    return spec


def _check_settings(spec: TuneSpec, search: dict, where: str) -> None:
    spec.metric = _one_of(search.get("metric", spec.metric), METRICS, f"{where}.metric")
    spec.mode = _one_of(search.get("mode", spec.mode), ("max", "min"), f"{where}.mode")
    spec.search_alg = _one_of(search.get("search_alg", spec.search_alg), SEARCH_ALGS, f"{where}.search_alg")
    spec.num_samples = _number(search.get("num_samples", spec.num_samples), f"{where}.num_samples", int, 1)
    spec.max_concurrent = _number(search.get("max_concurrent", spec.max_concurrent), f"{where}.max_concurrent",
                                  int, 1)
    spec.seed = _number(search.get("seed", spec.seed), f"{where}.seed", int, 0)
    sched = search.get("scheduler", spec.scheduler)
    sched = {"name": sched} if isinstance(sched, str) else sched
    if not isinstance(sched, dict):
        raise HarnessError(f"{where}.scheduler: expected asha, none or a mapping with name: asha")
    _one_of(sched.get("name"), ("asha", "none"), f"{where}.scheduler.name")
    _no_extra(sched, {"name", "grace_period", "reduction_factor"}, f"{where}.scheduler")
    spec.scheduler = {"name": sched["name"],
                      "grace_period": _number(sched.get("grace_period", 1), f"{where}.scheduler.grace_period",
                                              int, 1),
                      "reduction_factor": _number(sched.get("reduction_factor", 2),
                                                  f"{where}.scheduler.reduction_factor", float, 1.01)}
    res = search.get("resources", spec.resources)
    if not isinstance(res, dict):
        raise HarnessError(f"{where}.resources: expected a mapping with cpus, gpus, workers")
    _no_extra(res, {"cpus", "gpus", "workers"}, f"{where}.resources")
    spec.resources = {"cpus": _number(res.get("cpus", 1), f"{where}.resources.cpus", float, 0.01),
                      "gpus": _number(res.get("gpus", 0), f"{where}.resources.gpus", float, 0.0),
                      "workers": _number(res.get("workers", 1), f"{where}.resources.workers", int, 1)}


def _one_of(value, allowed: tuple, where: str):
    if value not in allowed:
        raise HarnessError(f"{where}: {value!r}, expected one of {', '.join(map(str, allowed))}")
    return value


def _number(value, where: str, kind: type, minimum: float):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (kind is float or value == int(value))
    if not ok or value < minimum:
        what = "an integer" if kind is int else "a number"
        raise HarnessError(f"{where}: {value!r}, expected {what} >= {minimum}")
    return kind(value)


def _no_extra(mapping: dict, allowed: set, where: str) -> None:
    extra = sorted(set(mapping) - allowed)
    if extra:
        raise HarnessError(f"{where}.{extra[0]}: unknown key (expected one of {sorted(allowed)})")


def _parse_space(space: Any, where: str) -> tuple[list[Param], dict[str, list]]:
    if not isinstance(space, dict) or not space:
        raise HarnessError(f"{where}.space: expected a mapping of recipe fields to distributions")
    params: list[Param] = []
    lists: dict[str, list] = {}
    for key, entry in space.items():
        key = str(key)
        if isinstance(entry, list):  # per-element space of a list field (scale weights, betas)
            lists[key] = []
            for i, item in enumerate(entry):
                if isinstance(item, dict):
                    params.append(_param(f"{key}.{i}", key, i, item, f"{where}.space.{key}[{i}]"))
                    lists[key].append(None)
                else:
                    lists[key].append(item)
        else:
            params.append(_param(key, key, None, entry, f"{where}.space.{key}"))
    return params, lists


def _param(name: str, fld: str, index: int | None, entry: Any, where: str) -> Param:
    if not isinstance(entry, dict):
        raise HarnessError(f"{where}: expected a mapping like {{loguniform: [low, high]}}")
    kinds = [k for k in entry if k in DISTRIBUTIONS]
    _no_extra(entry, {*DISTRIBUTIONS, "when"}, where)
    if len(kinds) != 1:
        raise HarnessError(f"{where}: expected exactly one of {', '.join(DISTRIBUTIONS)}")
    kind, values = kinds[0], entry[kinds[0]]
    if not isinstance(values, list) or not values:
        raise HarnessError(f"{where}.{kind}: expected a non-empty list")
    if kind in ("uniform", "loguniform", "randint"):
        _check_bounds(kind, values, where)
    when = entry.get("when") or {}
    if not isinstance(when, dict):
        raise HarnessError(f"{where}.when: expected a mapping like {{schedule.name: multistep}}")
    cond = tuple((str(k), tuple(v if isinstance(v, list) else [v])) for k, v in when.items())
    return Param(name, fld, index, kind, tuple(values), cond)


def _check_bounds(kind: str, values: list, where: str) -> None:
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if len(values) != 2 or not numeric:
        raise HarnessError(f"{where}.{kind}: expected [low, high] numbers, got {values!r}")
    low, high = values
    if not low < high:
        raise HarnessError(f"{where}.{kind}: bounds [{low}, {high}]: low must be below high")
    if kind == "loguniform" and low <= 0:
        raise HarnessError(f"{where}.{kind}: bounds [{low}, {high}]: loguniform needs low > 0")
    if kind == "randint" and not all(float(v).is_integer() for v in values):
        raise HarnessError(f"{where}.{kind}: bounds [{low}, {high}]: randint needs integers")


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


# ----------------------------------------------------------------------------- the Ray side


def ray_search_space(spec: TuneSpec) -> dict:
    from ray import tune

    space = {}
    for p in spec.params:
        lo_hi = p.values
        if p.kind == "uniform":
            space[p.name] = tune.uniform(*lo_hi)
        elif p.kind == "loguniform":
            space[p.name] = tune.loguniform(*lo_hi)
        elif p.kind == "randint":
            space[p.name] = tune.randint(int(lo_hi[0]), int(lo_hi[1]) + 1)  # inclusive high
        elif p.kind == "choice":
            space[p.name] = tune.choice(list(p.values))
        else:
            space[p.name] = tune.grid_search(list(p.values))
    return space


def search_algorithm(spec: TuneSpec):
    if spec.search_alg == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=spec.seed), max_concurrent=spec.max_concurrent)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(max_concurrent=spec.max_concurrent, random_state=spec.seed)


def trial_scheduler(spec: TuneSpec):
    if spec.scheduler["name"] == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    # The validation index comes from the trainer's step, not from Tune's report counter: a trial
    # resumed from a trainer checkpoint newer than Tune's saved state still counts right.
    return ASHAScheduler(time_attr=VALIDATION, max_t=spec.max_t,
                         grace_period=min(spec.scheduler["grace_period"], spec.max_t),
                         reduction_factor=spec.scheduler["reduction_factor"])


def trainable(spec: TuneSpec):
    """The Tune function with its resources: the trial's own CPUs/GPUs for one worker; a token CPU
    for the function when a TorchTrainer's workers hold the real resources (design.md §6)."""
    from ray import tune

    res = spec.resources
    fn = tune.with_parameters(run_trial, spec=spec)
    if res["workers"] > 1:
        return tune.with_resources(fn, {"cpu": 0.01})
    return tune.with_resources(fn, {"cpu": res["cpus"], "gpu": res["gpus"]})


# ----------------------------------------------------------------------------- one trial


def run_trial(config: dict, spec: TuneSpec) -> None:
    """Tune function: build the trial's recipe, then train it with harness.train.run."""
    from ray import tune

    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()
    recipe = spec.trial_recipe(config, trial_id)
    run_dir = spec.exp_dir / TRIALS / trial_id
    run_dir.mkdir(parents=True, exist_ok=True)
    run_id = child_run(spec, trial_id, run_dir)
    if spec.resources["workers"] == 1:
        resume = resume_point(tune.get_checkpoint(), run_dir)
        _train_here(recipe, run_dir, resume, run_id, TuneReporter(recipe))
        return
    _fit_torch_trainer(spec, recipe, run_dir, run_id, trial_id)


def _train_here(recipe: Recipe, run_dir: Path, resume: str, run_id: str | None, reporter) -> dict:
    from harness.distributed import free_port
    from harness.train import run

    if "RANK" not in os.environ:
        # A world of one on its own free port: concurrent trials never share a rendezvous port
        # (a MASTER_PORT inherited from a launcher would collide).
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    if run_id:
        os.environ["MLFLOW_RUN_ID"] = run_id  # the trainer's tracker continues the nested child run
    summary = run(recipe, run_dir, resume=resume, callbacks=reporter)
    reporter.flush()
    return summary


def _fit_torch_trainer(spec: TuneSpec, recipe: Recipe, run_dir: Path, run_id: str | None, trial_id: str) -> None:
    """A data-parallel trial: Ray Train workers (with Ray's own free rendezvous port) run the trainer."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    res = spec.resources
    workers = res["workers"]
    per_worker = {"CPU": res["cpus"] / workers, **({"GPU": res["gpus"] / workers} if res["gpus"] else {})}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"recipe": recipe.model_dump(mode="json"), "source": recipe.source,
                           "run_dir": str(run_dir), "run_id": run_id},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=res["gpus"] > 0, resources_per_worker=per_worker),
        # Same name and storage on a restored trial: Ray Train resumes from its latest checkpoint.
        run_config=RunConfig(name=trial_id, storage_path=str(spec.exp_dir / "train"),
                             callbacks=[TuneReportCallback()]),
    )
    trainer.fit()


def train_worker(cfg: dict) -> None:
    """One Ray Train worker: the same trainer, in Ray's process group."""
    import ray.train

    recipe = recipe_from_dict(cfg["recipe"], cfg["source"])
    run_dir = Path(cfg["run_dir"])
    rank = ray.train.get_context().get_world_rank()
    resume = resume_point(ray.train.get_checkpoint(), run_dir)
    reporter = TrainReporter(recipe, rank)
    _train_here(recipe, run_dir, resume, cfg["run_id"] if rank == 0 else None, reporter)


class _Reporter:
    """`on_validation` callback of harness.train.run: report metrics with a checkpoint pointer.

    The final validation is reported only after `run` returns: a trial at max_t is stopped by
    ASHA as soon as Tune sees that report, and the trainer must first export its weights,
    write summary.json and close its MLflow run."""

    def __init__(self, recipe: Recipe) -> None:
        self.total, self.every = total_steps(recipe), recipe.eval.every
        self.final: tuple | None = None

    def on_validation(self, step: int, metrics: dict, checkpoint_dir: Path) -> None:
        if step >= self.total:
            self.final = (step, metrics, checkpoint_dir)
            return
        self._send(step, metrics, checkpoint_dir)

    def flush(self) -> None:
        if self.final is not None:
            self._send(*self.final)
            self.final = None

    def _send(self, step: int, metrics: dict, checkpoint_dir: Path) -> None:
        metrics = {**{k: float(v) for k, v in metrics.items()}, "step": step,
                   VALIDATION: -(-step // self.every)}  # validations happen at every-th steps and the last
        with tempfile.TemporaryDirectory(prefix="mimo-tune-ckpt-") as tmp:
            pointer = {"tag": Path(checkpoint_dir).name, "step": step}
            Path(tmp, POINTER).write_text(json.dumps(pointer))
            self.report(metrics, tmp)

    def report(self, metrics: dict, pointer_dir: str) -> None:
        raise NotImplementedError


class TuneReporter(_Reporter):
    def report(self, metrics: dict, pointer_dir: str) -> None:
        from ray import tune

        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(pointer_dir))


class TrainReporter(_Reporter):
    def __init__(self, recipe: Recipe, rank: int) -> None:
        super().__init__(recipe)
        self.rank = rank

    def report(self, metrics: dict, pointer_dir: str) -> None:
        import ray.train

        # Every worker reports (it is a barrier); rank 0 carries the checkpoint.
        ckpt = ray.train.Checkpoint.from_directory(pointer_dir) if self.rank == 0 else None
        ray.train.report(metrics, checkpoint=ckpt)


def resume_point(ckpt, run_dir: Path) -> str:
    """The trainer checkpoint that Tune/Train recorded last, or 'auto' (newest complete one in the
    run dir, e.g. one saved before the first validation; nothing for a new trial)."""
    from harness import checkpoint

    if ckpt is None:
        return "auto"
    with ckpt.as_directory() as d:
        pointer = Path(d) / POINTER
        tag = json.loads(pointer.read_text())["tag"] if pointer.is_file() else None
    tag_dir = checkpoint.checkpoint_dir(run_dir) / tag if tag else None
    if tag_dir is not None and checkpoint.is_complete(tag_dir):
        return str(tag_dir)
    return "auto"


# ----------------------------------------------------------------------------- MLflow


def _client(uri: str):
    import mlflow

    return mlflow.MlflowClient(uri)


def child_run(spec: TuneSpec, trial_id: str, run_dir: Path) -> str | None:
    """The trial's MLflow run, nested under the experiment's parent; created once per trial
    (a restarted trial continues it, so params are never logged twice with new values)."""
    path = run_dir / RUN_ID_FILE
    if path.is_file():
        return path.read_text().strip() or None
    if not (spec.tracking_uri and spec.parent_run_id):
        return None
    try:
        run = _client(spec.tracking_uri).create_run(
            spec.experiment_id, run_name=f"{spec.name}-{trial_id}",
            tags={"mlflow.parentRunId": spec.parent_run_id, "mimo.tune.trial_id": trial_id,
                  "mimo.tune.experiment": str(spec.exp_dir)})
    except Exception as exc:  # noqa: BLE001 - tracking never costs a trial its run
        log.warning("tune: no MLflow child run for trial %s: %s", trial_id, str(exc).splitlines()[0][:200])
        return None
    with atomic_write(path) as tmp:
        tmp.write_text(run.info.run_id)
    return run.info.run_id


def start_parent_run(spec: TuneSpec) -> None:
    """Create the experiment's parent run and log the search space (once)."""
    from harness.tracking import _experiment_id, clean_params, environment_params

    cfg = spec.base_recipe.tracking
    try:
        client = _client(spec.tracking_uri)
        spec.experiment_id = _experiment_id(client, cfg.experiment)
        run = client.create_run(spec.experiment_id, run_name=spec.name,
                                tags={"mimo.tune.experiment": str(spec.exp_dir), "mimo.tune.parent": "true"})
    except Exception as exc:  # noqa: BLE001
        log.warning("tune: MLflow parent run not created (%s); trials are not tracked",
                    str(exc).splitlines()[0][:200])
        return
    spec.parent_run_id = run.info.run_id
    params = {"search.space." + p.name: f"{p.kind}{list(p.values)}" + (f" when {dict(p.when)}" if p.when else "")
              for p in spec.params}
    params.update({f"search.{k}": v for k, v in (("metric", spec.metric), ("mode", spec.mode),
                   ("num_samples", spec.num_samples), ("search_alg", spec.search_alg),
                   ("max_concurrent", spec.max_concurrent), ("scheduler", spec.scheduler),
                   ("resources", spec.resources), ("seed", spec.seed))})
    _mlflow_safely("log search space", lambda: _log_params(client, run.info.run_id,
                                                            {**clean_params(params), **environment_params()}))


def _log_params(client, run_id: str, params: dict) -> None:
    from mlflow.entities import Param as MlParam

    items = list(params.items())
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=[MlParam(k, str(v)) for k, v in items[i:i + 100]])


def _mlflow_safely(what: str, fn) -> Any:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - results on disk matter more than the tracking server
        log.warning("tune: MLflow %s failed: %s", what, str(exc).splitlines()[0][:200])
        return None


def finish_tracking(spec: TuneSpec, rows: list[dict], best: dict | None) -> None:
    """Close the trials' child runs, register the best model, record the best config on the parent."""
    from harness.tracking import clean_params

    client = _client(spec.tracking_uri)
    for row in rows:
        if row["mlflow_run_id"]:
            _mlflow_safely("close trial run", lambda row=row: _close_child(client, row))
    if best is not None:
        _mlflow_safely("register best model", lambda: register_best(spec, best))
    run_id = spec.parent_run_id

    def record() -> None:
        from mlflow.entities import Metric

        if best is not None:
            _log_params(client, run_id, clean_params({f"best.{k}": v for k, v in best["params"].items()}
                                                     | {"best.trial_id": best["trial_id"]}))
            client.log_batch(run_id, metrics=[Metric(f"best_{spec.metric}", best[spec.metric], _now_ms(), 0)])
        for name in (RESULTS, BEST_RECIPE):
            if (spec.exp_dir / name).is_file():
                client.log_artifact(run_id, str(spec.exp_dir / name))
        client.set_terminated(run_id, "FINISHED")

    _mlflow_safely("record the best trial", record)


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


def _close_child(client, row: dict) -> None:
    """An ASHA-stopped trial reads KILLED (the trainer saw Tune's stop as a failure, or never
    closed its run); a trial still RUNNING after the experiment failed."""
    run_id = row["mlflow_run_id"]
    client.set_tag(run_id, "mimo.tune.status", row["status"])
    if row["status"] == "STOPPED":
        client.set_terminated(run_id, "KILLED")
    elif client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, "FAILED")


def register_best(spec: TuneSpec, best: dict) -> int | None:
    """Log the best trial's weights on its child run and register them (champion by the usual rule)."""
    from harness import checkpoint
    from harness.tracking import MlflowTracker
    from harness.train import WEIGHTS

    cfg = spec.base_recipe.tracking
    if not cfg.registered_model:
        return None
    run_dir = Path(best["run_dir"])
    weights = run_dir / WEIGHTS
    if not weights.is_file():  # stopped by ASHA before its final export
        weights = checkpoint.export(run_dir, weights, ema=spec.base_recipe.train.ema_decay is not None)
    cfg = cfg.model_copy(update={"tracking_uri": spec.tracking_uri})
    tracker = MlflowTracker(cfg, run_dir, resume_run_id=best["mlflow_run_id"], log_environment=False)
    version = tracker.log_model(weights, best["val_psnr"])
    tracker.close("FINISHED")
    return version


# ----------------------------------------------------------------------------- results


def result_rows(spec: TuneSpec, grid) -> list[dict]:
    """One row per trial: status, validations reached, last and best metric, its sampled values."""
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name
        validations = int(metrics.get(VALIDATION) or 0)
        history = result.metrics_dataframe
        best_metric = None
        if history is not None and spec.metric in history:
            series = history[spec.metric]
            best_metric = float(series.max() if spec.mode == "max" else series.min())
        status = "ERROR" if result.error else ("TERMINATED" if validations >= spec.max_t else "STOPPED")
        run_dir = spec.exp_dir / TRIALS / str(trial_id)
        run_id_file = run_dir / RUN_ID_FILE
        rows.append({"trial_id": trial_id, "status": status, VALIDATION: validations,
                     "step": metrics.get("step"), "val_psnr": metrics.get("val_psnr"),
                     "val_ssim": metrics.get("val_ssim"), f"best_{spec.metric}": best_metric,
                     "params": spec.sampled_fields(result.config or {}), "run_dir": str(run_dir),
                     "mlflow_run_id": run_id_file.read_text().strip() if run_id_file.is_file() else None})
    return sorted(rows, key=lambda r: str(r["trial_id"]))


def pick_best(spec: TuneSpec, rows: list[dict]) -> dict | None:
    """Best last metric among trials that trained to the end (else among all that reported)."""
    scored = [r for r in rows if r[spec.metric] is not None and r["status"] != "ERROR"]
    finished = [r for r in scored if r["status"] == "TERMINATED"] or scored
    if not finished:
        return None
    sign = 1 if spec.mode == "max" else -1
    return max(finished, key=lambda r: sign * r[spec.metric])


def write_results(spec: TuneSpec, rows: list[dict]) -> Path:
    keys = sorted({k for r in rows for k in r["params"]})
    head = ["trial_id", "status", VALIDATION, "step", "val_psnr", "val_ssim", f"best_{spec.metric}", *keys,
            "mlflow_run_id", "run_dir"]
    path = spec.exp_dir / RESULTS
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(head)
        for r in rows:
            writer.writerow([_cell(r["params"].get(k, "")) if k in keys else _cell(r.get(k)) for k in head])
    return path


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _short_cell(value) -> str:
    if isinstance(value, list):  # per-scale weights, betas: 4 significant digits on screen
        return "[" + ", ".join(_cell(v) if not isinstance(v, float) else f"{v:.4g}" for v in value) + "]"
    return _cell(value)


def format_table(spec: TuneSpec, rows: list[dict]) -> str:
    keys = sorted({k for r in rows for k in r["params"]})
    head = ["trial", "status", "val#", spec.metric, *keys]
    body = [[str(r["trial_id"]), r["status"], str(r[VALIDATION]), _cell(r[spec.metric]),
             *(_short_cell(r["params"].get(k)) for k in keys)] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in [head, *body])


def write_best_recipe(spec: TuneSpec, best: dict) -> Path:
    """A plain training recipe with the winning values (tracking/registry as in the base recipe)."""
    raw = apply_overrides(spec.base, [f"{k}={_yaml_value(v)}" for k, v in best["params"].items()]
                          + [f"name={spec.name}-best"], spec.source)
    recipe = recipe_from_dict(raw, f"{spec.source} (best trial {best['trial_id']})")
    path = spec.exp_dir / BEST_RECIPE
    header = (f"# Best of tune experiment {spec.exp_dir} (trial {best['trial_id']}, "
              f"{spec.metric} {best[spec.metric]:.4f}).\n# Train it: deepspeed harness/train.py --recipe {path}\n")
    with atomic_write(path) as tmp:
        tmp.write_text(header + dump_recipe(recipe))
    return path


# ----------------------------------------------------------------------------- the driver


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m harness.tune", description=__doc__.splitlines()[0])
    add_arguments(p)
    return p.parse_intermixed_args(argv)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `python -m harness.tune` and `mimo tune` (one definition for both)."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--recipe", help="tune recipe YAML (recipes/tune-*.yaml)")
    src.add_argument("--resume", metavar="EXP_DIR", help="continue an interrupted experiment")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("overrides", nargs="*", metavar="key.path=value",
                   help="search.* keys change the search, others the base training recipe")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return execute(args)
    except HarnessError as exc:
        print(f"tune: error: {exc}", file=sys.stderr)
        return 2


def execute(args: argparse.Namespace) -> int:
    """Run (or resume) an experiment and print its results; HarnessError for bad input."""
    spec = prepare(args)
    rows, best = run_experiment(spec, resume=bool(args.resume), address=args.address)
    print(format_table(spec, rows))
    print(f"results: {spec.exp_dir / RESULTS}")
    if best is None:
        print("tune: no trial reported a metric; no best recipe", file=sys.stderr)
        return 1
    print(f"best: trial {best['trial_id']} {spec.metric}={best[spec.metric]:.4f}; "
          f"recipe {spec.exp_dir / BEST_RECIPE}")
    return 0


def prepare(args: argparse.Namespace) -> TuneSpec:
    """Load and check everything (no Ray yet); write tune_spec.json; start the MLflow parent run."""
    if args.resume:
        if args.overrides:
            raise HarnessError("--resume takes no overrides: the experiment keeps its recipe")
        path = Path(args.resume) / SPEC
        if not path.is_file():
            raise HarnessError(f"--resume {args.resume}: no {SPEC} there (expected an experiment directory)")
        return TuneSpec.from_json(path.read_text())
    spec = load_tune_recipe(args.recipe, args.overrides)
    from harness.train import preflight

    preflight(spec.base_recipe, None, spec.resources["workers"])  # model, shards, batch split
    if (spec.exp_dir / SPEC).exists():
        raise HarnessError(f"{spec.exp_dir}: experiment exists; continue it with --resume {spec.exp_dir} "
                           "or set search.name")
    _check_tracking(spec)
    spec.exp_dir.mkdir(parents=True, exist_ok=True)
    if spec.tracking_uri:
        start_parent_run(spec)
    with atomic_write(spec.exp_dir / SPEC) as tmp:
        tmp.write_text(spec.to_json())
    return spec


def _check_tracking(spec: TuneSpec) -> None:
    """Parallel trials need an MLflow server: several processes on one sqlite file lock it."""
    from harness.tracking import resolve_tracking_uri

    cfg = spec.base_recipe.tracking
    if not cfg.enabled:
        return
    uri = resolve_tracking_uri(cfg.tracking_uri)
    if not uri.startswith(("http://", "https://", "databricks")):
        raise HarnessError(f"{spec.source}: tracking.tracking_uri: {uri!r}; tune trials need an MLflow server "
                           "(http://host:port), not a local store shared by parallel processes")
    spec.tracking_uri = uri


def run_experiment(spec: TuneSpec, *, resume: bool, address: str | None) -> tuple[list[dict], dict | None]:
    import ray
    from ray import tune

    # Tune's experiment state is what --resume restores: save it often (it is small).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "5")
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
    try:
        fn = trainable(spec)
        if resume:
            tuner = tune.Tuner.restore(str(spec.exp_dir), trainable=fn, resume_errored=True)
        else:
            tuner = tune.Tuner(
                fn, param_space=ray_search_space(spec),
                tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, num_samples=spec.num_samples,
                                            scheduler=trial_scheduler(spec), search_alg=search_algorithm(spec)),
                run_config=tune.RunConfig(name=spec.name, storage_path=spec.storage_path, verbose=1,
                                          failure_config=tune.FailureConfig(max_failures=0)))
        grid = tuner.fit()
    finally:
        ray.shutdown()
    rows = result_rows(spec, grid)
    write_results(spec, rows)
    best = pick_best(spec, rows)
    if best is not None:
        write_best_recipe(spec, best)
    if spec.tracking_uri and spec.parent_run_id:
        finish_tracking(spec, rows, best)
    return rows, best


if __name__ == "__main__":
    # The package's module, not this __main__ copy: Tune pickles the trainable by reference.
    from harness.tune import main as _main

    with contextlib.suppress(BrokenPipeError):
        sys.exit(_main())
