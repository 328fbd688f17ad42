"""One trial: the trial's recipe trained by the trainer itself (`harness.train.run`), in the trial's
own process for `workers: 1` or as a Ray Train `TorchTrainer` of `workers` ranks. It reports val
PSNR/SSIM at each validation with a pointer to the trainer's own torn-safe checkpoint, so ASHA can
stop it and a restored experiment resumes it from there."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from harness.recipe import Recipe, recipe_from_dict, total_steps
from harness.tune.spec import TuneSpec

TRIALS = "trials"  # <exp>/trials/<trial_id>: the trainer's run dir of each trial
POINTER = "tune_pointer.json"  # what a Tune checkpoint holds: the trainer checkpoint tag
VALIDATION = "validation"  # reported with each result: 1, 2, ... (ASHA's time attribute)


def trainable(spec: TuneSpec):
    """The Tune function with its resources: the trial's own CPUs/GPUs for one worker; a token CPU
    for the function when a TorchTrainer's workers hold the real resources (docs/design.md §6)."""
    from ray import tune

    res = spec.resources
    fn = tune.with_parameters(run_trial, spec=spec)
    if res["workers"] > 1:
        return tune.with_resources(fn, {"cpu": 0.01})
    return tune.with_resources(fn, {"cpu": res["cpus"], "gpu": res["gpus"]})

def run_trial(config: dict, spec: TuneSpec) -> None:
    """Tune function: build the trial's recipe, then train it with harness.train.run."""
    from ray import tune

    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()
    recipe = spec.trial_recipe(config, trial_id)
    run_dir = spec.exp_dir / TRIALS / trial_id
    run_dir.mkdir(parents=True, exist_ok=True)
    if spec.resources["workers"] == 1:
        resume = resume_point(tune.get_checkpoint(), run_dir)
        _train_here(recipe, run_dir, resume, TuneReporter(recipe))
        return
    _fit_torch_trainer(spec, recipe, run_dir, trial_id)

def _train_here(recipe: Recipe, run_dir: Path, resume: str, reporter) -> dict:
    from harness.distributed import free_port
    from harness.train import run

    if "RANK" not in os.environ:
        # A world of one on its own free port: concurrent trials never share a rendezvous port
        # (a MASTER_PORT inherited from a launcher would collide).
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    summary = run(recipe, run_dir, resume=resume, callbacks=reporter)
    reporter.flush()
    return summary

def _fit_torch_trainer(spec: TuneSpec, recipe: Recipe, run_dir: Path, trial_id: str) -> None:
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
                           "run_dir": str(run_dir)},
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
    _train_here(recipe, run_dir, resume, reporter)

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
