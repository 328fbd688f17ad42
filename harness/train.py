"""Train MIMO-UNet with DeepSpeed: `deepspeed harness/train.py --recipe recipes/plus.yaml [k=v ...]`.

Also runs as `python harness/train.py ...` (one process), under torchrun, srun and Ray Train
(`run()` reuses an existing process group). Read top to bottom: arguments -> preflight checks
(before any rank does work) -> `run`: process group, model + DeepSpeed engine, resume, the loop
(step, log, validate, checkpoint, stop on SIGTERM/SIGUSR1) -> export and summary.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from harness import checkpoint, console, distributed
from harness.errors import HarnessError
from harness.files import atomic_write
from harness.lock import RunLock
from harness.recipe import (
    Recipe,
    batch_split,
    check_data,
    deepspeed_config,
    dump_recipe,
    load_recipe,
    lr_factor_fn,
    recipe_changes,
    recipe_from_dict,
    total_steps,
)

SUMMARY = "summary.json"
STOP_POLL = 10  # steps between cross-rank checks for a stop signal (when logging is sparser)
LOG = "log.jsonl"
WEIGHTS = "weights.pkl"
EVAL_PROTOCOL = "default"  # the paper's: RGB, data range 1, full frame (harness.protocols)

# ----------------------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `harness/train.py` and `mimo train` (one definition for both)."""
    p.add_argument("--recipe", required=True, help="recipe YAML (recipes/*.yaml)")
    p.add_argument("--run-dir", help="output directory (default runs/<recipe name>-<timestamp>)")
    p.add_argument("--resume", default="auto",
                   help="auto (newest complete checkpoint in the run dir), never, or a checkpoint tag dir")
    p.add_argument("--print-recipe", action="store_true", help="print the resolved recipe and DeepSpeed config")
    p.add_argument("--dry-run", action="store_true", help="validate recipe, shards and run dir, then exit")
    p.add_argument("--verbose", action="store_true",
                   help="show the libraries' log lines too (same as train.log_level=verbose)")
    p.add_argument("overrides", nargs="*", metavar="key.path=value")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="harness/train.py", description=__doc__.splitlines()[0])
    add_arguments(p)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_intermixed_args(argv)


def default_run_dir(recipe: Recipe) -> Path:
    """runs/<recipe name>-<timestamp>: where a run goes without --run-dir."""
    return Path(f"runs/{recipe.name or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)
    overrides = [*args.overrides, *(["train.log_level=verbose"] if args.verbose else [])]
    try:
        recipe = load_recipe(args.recipe, overrides)
        console.setup(verbose=recipe.train.log_level == "verbose", is_main=_env_rank() == 0)
        if args.print_recipe:
            print(describe(recipe, world_size))
            return 0
        run_dir = Path(args.run_dir) if args.run_dir else None
        preflight(recipe, run_dir, world_size)
        if args.dry_run:
            print(f"ok: {recipe.source} ({total_steps(recipe)} steps, world size {world_size})")
            return 0
        summary = run(recipe, run_dir, resume=args.resume)
    except HarnessError as exc:
        # Every rank fails the same check; one line from rank 0 is enough.
        if _env_rank() == 0:
            print(f"train: error: {exc}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()
    if summary.get("stopped"):
        print(f"train: stopped by signal at step {summary['final_step']}, checkpoint saved", file=sys.stderr)
    _say_unsent(Path(summary["run_dir"]))
    return 0


def _say_unsent(run_dir: Path) -> None:
    """The last line, when tracking records are still unsent (the server never came back)."""
    from harness.tracking import OFFLINE_FILE

    if _env_rank() == 0 and (run_dir / OFFLINE_FILE).is_file():
        print(f"train: tracking records not sent yet are in {run_dir / OFFLINE_FILE}; send them with "
              f"`mimo tracking replay {run_dir}`", file=sys.stderr, flush=True)


def _env_rank() -> int:
    return int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or 0)


def describe(recipe: Recipe, world_size: int) -> str:
    """The resolved recipe and the DeepSpeed config `run` would use at this world size."""
    ds = json.dumps(deepspeed_config(recipe, world_size), indent=2)
    return f"# recipe ({recipe.source})\n{dump_recipe(recipe)}\n# deepspeed config (world size {world_size})\n{ds}"


def preflight(recipe: Recipe, run_dir: Path | None, world_size: int) -> None:
    """Everything that can be checked before a rank starts work; raises one-line HarnessErrors."""
    from harness.models import MODEL_NAMES

    if recipe.model.name not in MODEL_NAMES:
        raise HarnessError(f"{recipe.source}: model.name: {recipe.model.name!r}, expected one of {MODEL_NAMES}")
    check_data(recipe)
    batch_split(recipe, world_size)
    total_steps(recipe)
    if run_dir is not None:
        check_writable(run_dir)


def check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise HarnessError(f"run dir {run_dir}: not writable ({exc.strerror or exc})") from None


# ----------------------------------------------------------------------------- the run


@dataclass
class State:
    """Loop counters stored in every checkpoint."""

    step: int = 0  # optimizer steps attempted (skipped non-finite steps included)
    skipped: int = 0
    best_psnr: float = -math.inf
    best_step: int = -1
    validations: int = 0

    @classmethod
    def from_dict(cls, raw: dict) -> State:
        # Checkpoints before the tracker saved its own state kept the MLflow run id here.
        return cls(**{k: v for k, v in raw.items() if k in cls.__dataclass_fields__})


class Run:
    """One process's view of a training run: engine, loader, tracker and the files it writes."""

    def __init__(self, recipe: Recipe, run_dir: Path | None, resume: str, callbacks) -> None:
        import torch

        self.recipe, self.callbacks = recipe, callbacks
        with console.quiet_prints(recipe.train.log_level != "verbose"):  # DeepSpeed's op-build lines
            self.world = distributed.init()
        torch.set_num_threads(recipe.train.threads or _default_threads())
        self.run_dir = _agree_run_dir(run_dir, recipe, self.world)
        self.ckpt_dir = checkpoint.checkpoint_dir(self.run_dir)
        self.micro, self.accum = batch_split(recipe, self.world.size)
        self.total = total_steps(recipe)
        self.state = State()
        self.saved_tracker: dict = {}  # the tracker's state_dict from the resumed checkpoint
        self.scores: dict[str, dict] = {}  # the last validation and test score, for the end-of-run block
        self.stop_requested = False  # the loop stopped early (signal): checkpointed, not finished
        self.stop_requested_by_signal = False  # set by the SIGTERM/SIGUSR1 handler
        # Rank 0 locks the run dir for the run's life; then it picks and checks the checkpoint
        # and compares recipes -- all before anything in the run dir is written.
        self.lock = _on_main(self.world, lambda: RunLock(self.run_dir).acquire(), share=False)
        try:
            self._resume_tag = _on_main(self.world, lambda: self._accept_resume(resume))
            self._protect = self._resume_tag  # pruning keeps it until a newer tag is complete
            self._write_run_files()
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    # -- setup -------------------------------------------------------------------------

    def _accept_resume(self, resume: str) -> str | None:
        """Rank 0: the verified tag to resume from, once the recipe may resume it; sets newer tags
        aside. Prints one line per fallback, set-aside tag and accepted recipe change."""
        tag, lines = _find_resume(self.ckpt_dir, resume)
        changed = []
        if tag is not None:
            old, where = checkpoint.tag_recipe(self.run_dir, tag)
            refused, changed = recipe_changes(_normalized(old, where), self.recipe.model_dump(mode="json"))
            if refused:
                raise HarnessError(f"{self.recipe.source}: cannot resume {tag} with a changed recipe: "
                                   f"{'; '.join(refused)} (the checkpoint was trained with the old values; "
                                   "train the new ones in another --run-dir)")
            lines += checkpoint.set_aside_newer(self.ckpt_dir, tag)
        if changed:
            lines.append(f"resuming {tag} with recipe changes: {'; '.join(changed)}")
            self.log_event("recipe_changed", tag=tag, changes=changed)
        for line in lines:
            print(f"train: {line}", file=sys.stderr, flush=True)
        return tag

    # -- setup -------------------------------------------------------------------------

    def _write_run_files(self) -> None:
        if self.world.is_main:  # after _accept_resume: recipe.yaml changes only with an accepted resume
            with atomic_write(self.run_dir / "recipe.yaml") as tmp:
                tmp.write_text(dump_recipe(self.recipe))
            with atomic_write(self.run_dir / "ds_config.json") as tmp:
                tmp.write_text(json.dumps(deepspeed_config(self.recipe, self.world.size), indent=2))
        distributed.barrier()

    def build(self) -> None:
        """Model, EMA, optimizer, LR schedule, DeepSpeed engine; then restore a checkpoint."""
        import deepspeed
        import torch

        from harness.ema import EMA
        from harness.models import create_model

        r = self.recipe
        distributed.seed_everything(r.train.seed, self.world.rank)  # same init weights on every rank
        config = deepspeed_config(r, self.world.size)
        load_tag, universal = None, False
        if self._resume_tag:
            load_tag, universal = checkpoint.prepare_load(self.ckpt_dir, self._resume_tag, self.world.size)
            if universal:
                config["checkpoint"] = {**config.get("checkpoint", {}), "load_universal": True}
        model = create_model(r.model.name, **r.model.overrides)
        # train.channels_last converts the inputs only: DeepSpeed's broadcast and ZeRO's flat
        # buffers need contiguous NCHW weights, and convs follow an NHWC input anyway.
        if torch.cuda.is_available():
            torch.backends.cudnn.benchmark = True  # fixed crop size: pick the fastest conv algorithms once
        self.ema = EMA(model, r.train.ema_decay) if r.train.ema_decay else None
        optim_cls = torch.optim.AdamW if r.optim.name == "adamw" else torch.optim.Adam
        optimizer = optim_cls(model.parameters(), lr=r.optim.lr, betas=r.optim.betas, eps=r.optim.eps,
                              weight_decay=r.optim.weight_decay, foreach=r.optim.impl == "foreach",
                              fused=r.optim.impl == "fused" or None)
        # Built on the raw optimizer and handed to DeepSpeed: engine.step() steps it, checkpoints hold it.
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor_fn(r))
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
        if r.train.compile:
            self.engine.compile()  # in place: state_dict keys (checkpoints, EMA, export) stay unprefixed
        # fp32 copy that validation and test scoring load the weights into, on the training device
        # (a CPU copy would score 1280x720 frames on the host during GPU training).
        self.eval_model = create_model(r.model.name, **r.model.overrides).to(self.engine.device).eval()
        if self.ema is not None:
            self.ema.model.to(self.engine.device)  # updated from the engine's weights every step
        loader_state = self._restore(load_tag) if load_tag else None
        self.loader = self._make_loader(loader_state)

    def _restore(self, tag: str) -> dict | None:
        client, entry, same_world = checkpoint.load(self.engine, self.ckpt_dir, tag, self.world.rank)
        self.state = State.from_dict(client["state"])
        self.saved_tracker = client.get("tracker") or {"run_id": client["state"].get("mlflow_run_id")}
        if same_world:
            distributed.set_rng_state(entry["rng"])
        else:
            # Elastic resume: RNG streams cannot map onto another world; derive fresh ones.
            distributed.seed_everything(self.recipe.train.seed + self.state.step, self.world.rank)
        if self.ema is not None:
            self.ema.load(self.ckpt_dir / tag / checkpoint.EMA_FILE)
        self.log_event("resumed", tag=tag, world_size=self.world.size, saved_world_size=client["world_size"],
                       loss_scale=_loss_scale(self.engine))
        return entry["loader"]

    def _make_loader(self, state: dict | None):
        from harness.data.stream import train_loader

        d = self.recipe.data
        # The data order depends on the global batch only (not on world size, micro batch, workers),
        # so a run at any world size, and an elastic resume, sees the same batches.
        loader = train_loader(d.train, crop=d.crop, crops_per_image=d.crops_per_image, batch_size=self.micro,
                              seed=self.recipe.train.seed, rank=self.world.rank, world_size=self.world.size,
                              workers=d.workers, augment=d.augment, global_batch=self.recipe.train.global_batch)
        if state is not None:
            loader.load_state_dict(state)
        return loader

    def start_tracking(self) -> None:
        from harness.tracking import Tracker, dataset_tags

        self.tracker = Tracker.create(self.recipe.tracking, self.run_dir, rank=self.world.rank,
                                      resume_run_id=self.saved_tracker.get("run_id"))
        if self.state.step == 0:
            self.tracker.log_params({**self.recipe.model_dump(mode="json"), "world_size": self.world.size,
                                     "gradient_accumulation": self.accum, "total_steps": self.total})
        for name in ("recipe.yaml", "ds_config.json"):
            self.tracker.log_artifact(self.run_dir / name)
        # Which shards the run saw: tags with the sha256 of each manifest.json.
        self.tracker.set_tags(dataset_tags(train=self.recipe.data.train, val=self.recipe.data.val,
                                           test=self.recipe.data.test))
        # How validation/test numbers are made (their metrics carry val_/test_seconds_per_image).
        e = self.recipe.eval
        self.tracker.set_tags({"mimo.eval.device": str(next(self.eval_model.parameters()).device),
                               "mimo.eval.precision": e.precision, "mimo.eval.ensemble": _ensemble_name(self.recipe),
                               "mimo.eval.protocol": EVAL_PROTOCOL})

    # -- the loop ----------------------------------------------------------------------

    def train(self) -> dict:
        from tqdm import tqdm

        r = self.recipe
        _install_stop_handlers(self)
        batches = iter(self.loader)
        self.bar = bar = tqdm(total=self.total, initial=self.state.step, unit="step", mininterval=2.0,
                              disable=not self.world.is_main, dynamic_ncols=True)
        nonfinite_streak, t_start, steps_here = 0, time.perf_counter(), 0
        t_log, step_log, wait_log = t_start, self.state.step, 0.0
        self.engine.train()
        while self.state.step < self.total:
            lr = self.scheduler.get_last_lr()[0]  # the LR this step uses
            loss, parts, wait = self.one_step(batches)
            self.state.step += 1
            steps_here += 1
            wait_log += wait
            log = self.state.step % r.train.log_every == 0 or self.state.step == self.total
            # Stop requests are agreed on across ranks at log steps (and at least every STOP_POLL
            # steps) rather than every step: each poll is a host sync.
            stop = (log or self.state.step % STOP_POLL == 0) and self.stop_agreed()
            applied = self.engine.was_step_applied()
            if applied:
                nonfinite_streak = 0
                if self.ema is not None:
                    self.ema.update(self.engine.module)
            else:
                self.state.skipped += 1
                nonfinite_streak += 1
                self.log_event("skipped_step", step=self.state.step, streak=nonfinite_streak)
                if nonfinite_streak >= r.train.max_nonfinite:
                    # "Right after": the first step after a resume may still be finite when only the
                    # optimizer state is bad (its update is what makes the weights non-finite).
                    self.abort_nonfinite(nonfinite_streak, right_after_resume=steps_here - nonfinite_streak <= 1)
            if log:  # mean step time since the last log (GPU work is async: per-step wall time is not)
                now = time.perf_counter()
                n = self.state.step - step_log
                self.log_step(loss, parts, lr, (now - t_log) / n, wait_log / n, bar)
                t_log, step_log, wait_log = now, self.state.step, 0.0
            bar.update(1)
            if r.data.test and r.eval.test_every and self.state.step % r.eval.test_every == 0 \
                    and self.state.step < self.total:  # the final test score comes from finish()
                self.test()
            validate = (self.state.step % r.eval.every == 0 or self.state.step == self.total) and r.data.val
            if validate:
                self.validate_and_save()
            elif stop or self.state.step % r.checkpoint.every == 0 or self.state.step == self.total:
                self.save(best=False)
            if stop:
                self.stop_requested = True
                break
        bar.close()
        elapsed = time.perf_counter() - t_start
        return {"images_per_sec": steps_here * r.train.global_batch / max(elapsed, 1e-9)}

    def abort_nonfinite(self, streak: int, right_after_resume: bool) -> None:
        r = self.recipe
        if right_after_resume and self._resume_tag:
            # Not saved: the new tag would only copy a state that may be corrupt.
            raise HarnessError(
                f"{r.source}: non-finite loss or gradients for {streak} steps in a row right after resuming "
                f"from {self.ckpt_dir / self._resume_tag}: that checkpoint may be bad (check it with `mimo "
                f"checkpoints verify {self.run_dir}`; resume an earlier one with --resume {self.ckpt_dir}/stepN)")
        self.save(best=False)  # kept for a look or a resume with a lower LR; prunes nothing (skipped step)
        raise HarnessError(f"{r.source}: non-finite loss or gradients for {streak} steps in "
                           f"a row (train.max_nonfinite); lower optim.lr or enable train.grad_clip")

    def one_step(self, batches):
        """Accumulate `accum` micro-batches and step; non-finite losses poison the step so that
        DeepSpeed's overflow check skips it on every rank (no update, no LR step).

        Returns the mean loss and parts as 0-d device tensors (no host sync here: they are read
        at log steps only) and the seconds spent waiting for data.
        """
        from harness.losses import mimo_loss
        from harness.precision import dtype_of

        r, dtype = self.recipe, dtype_of(self.recipe.train.precision)
        loss_sum, parts_sum, wait = 0.0, {}, 0.0
        for _ in range(self.accum):
            t0 = time.perf_counter()
            batch = next(batches)
            wait += time.perf_counter() - t0
            outputs = self.engine(self._to_device(batch["blur"], dtype))
            loss, parts = mimo_loss(outputs, self._to_device(batch["sharp"]), fft_weight=r.loss.fft_weight,
                                    scale_weights=r.loss.scale_weights)
            loss = loss * self._poison(loss)
            self.engine.backward(loss)
            self.engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
            loss_sum = loss_sum + loss.detach()
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v
        n = self.accum
        return loss_sum / n, {k: v / n for k, v in parts_sum.items()}, wait

    def _to_device(self, t, dtype=None):
        """Non-blocking copy of a uint8 batch (the stream pins memory on CUDA), converted to `dtype`
        in [0, 1] on the device; NHWC when train.channels_last, else NCHW."""
        import torch

        from harness.data.crops import to_float

        t = to_float(t.to(self.engine.device, non_blocking=True), dtype)
        fmt = torch.channels_last if self.recipe.train.channels_last else torch.contiguous_format
        return t.contiguous(memory_format=fmt)

    def _poison(self, loss):
        """1.0, or NaN when the loss is non-finite on any rank; all-reduced on the device, no host sync."""
        import torch
        import torch.distributed as dist

        bad = (~torch.isfinite(loss.detach())).float().reshape(1)
        if self.world.size > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return torch.where(bad[0] > 0, float("nan"), 1.0)

    def stop_agreed(self) -> bool:
        """True on every rank when any rank was asked to stop (SIGTERM/SIGUSR1)."""
        return distributed.any_flag(self.stop_requested_by_signal)[0]

    # -- logging -----------------------------------------------------------------------

    def log_step(self, loss, parts: dict, lr: float, dt: float, wait: float, bar) -> None:
        loss, parts = float(loss), {k: float(v) for k, v in parts.items()}  # the host sync, at log steps only
        mean_loss = distributed.all_sum([loss])[0] / self.world.size
        grad_norm = self.engine.get_global_grad_norm()
        record = {"step": self.state.step, "samples": self.state.step * self.recipe.train.global_batch,
                  "loss": mean_loss, "loss_rank0": loss, **parts, "lr": lr,
                  "grad_norm": float(grad_norm) if grad_norm is not None else None,
                  "images_per_sec": self.recipe.train.global_batch / max(dt, 1e-9),
                  "data_wait": wait / max(dt, 1e-9), "peak_mem_mb": _peak_memory_mb(),
                  "skipped": self.state.skipped, "loss_scale": _loss_scale(self.engine)}
        self.log_event("train", **record)
        bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", ips=f"{record['images_per_sec']:.1f}")
        if self.state.step % self.recipe.tracking.log_every == 0:
            self.tracker.log_metrics({k: v for k, v in record.items() if isinstance(v, (int, float))},
                                     step=self.state.step)

    def say_score(self, kind: str, m: dict) -> None:
        """One console line per validation/test score (rank 0), above the progress bar."""
        m = {**m, "step": self.state.step}
        self.scores[kind] = m
        if self.world.is_main:
            from tqdm import tqdm

            tqdm.write(console.score_line(kind, self.state.step, self.total, m), file=sys.stderr)

    def log_event(self, event: str, **fields) -> None:
        """Append one JSON line to <run_dir>/log.jsonl (rank 0 only)."""
        if not self.world.is_main:
            return
        fields = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in fields.items()}
        with open(self.run_dir / LOG, "a") as fh:  # strict JSON: non-finite values become null
            fh.write(json.dumps({"event": event, "time": time.time(), **fields}) + "\n")

    # -- validation and checkpoints ------------------------------------------------------

    def validate_and_save(self) -> dict:
        metrics, settings = self.validate()
        improved = metrics["val_psnr"] > self.state.best_psnr
        if improved:
            self.state.best_psnr, self.state.best_step = metrics["val_psnr"], self.state.step
        # Recorded before the checkpoint, whose save persists the tracking queue: a run killed
        # right after it resumes past this validation and would never log it again.
        self.log_event("validation", step=self.state.step, **metrics, **settings)
        self.say_score("val", {"psnr": metrics["val_psnr"], "ssim": metrics["val_ssim"],
                               "blurred_psnr": metrics["blurred_psnr"], "images": metrics["val_images"], **settings})
        self.tracker.log_metrics({**metrics, "val_seconds_per_image": settings["seconds_per_image"]},
                                 step=self.state.step)
        tag_dir = self.save(best=improved)
        if self.callbacks is not None and hasattr(self.callbacks, "on_validation"):
            self.callbacks.on_validation(self.state.step, dict(metrics), tag_dir)
        self.last_metrics = metrics
        return metrics

    def validate(self) -> tuple[dict, dict]:
        """Score data.val, the only set anything is chosen on (best, ASHA, the tune metric) ->
        (val_psnr, val_ssim, blurred_psnr, val_images), (device, precision, ensemble, s/image)."""
        r = self.recipe
        keep = r.eval.images if self.world.is_main and self.state.validations % r.tracking.images_every == 0 else 0
        scores, settings = self._score(r.data.val, max_images=r.eval.max_images, keep=keep)
        self.state.validations += 1
        return {"val_psnr": scores[0], "val_ssim": scores[1], "blurred_psnr": scores[2],
                "val_images": int(scores[4])}, settings

    def test(self) -> dict:
        """Score data.test, in full: reported (log.jsonl `test` event, MLflow, summary.json), never
        used to choose anything."""
        scores, settings = self._score(self.recipe.data.test, max_images=None, keep=0)
        metrics = {"test_psnr": scores[0], "test_ssim": scores[1], "test_blurred_psnr": scores[2],
                   "test_blurred_ssim": scores[3], "test_images": int(scores[4])}
        self.log_event("test", step=self.state.step, **metrics, **settings)
        self.say_score("test", {"psnr": metrics["test_psnr"], "ssim": metrics["test_ssim"],
                                "blurred_psnr": metrics["test_blurred_psnr"], "blurred_ssim": metrics["test_blurred_ssim"],
                                "images": metrics["test_images"], **settings})
        self.tracker.log_metrics({**metrics, "test_seconds_per_image": settings["seconds_per_image"]},
                                 step=self.state.step)
        self.test_metrics = {**metrics, **settings}
        return self.test_metrics

    def _score(self, source: str, *, max_images: int | None, keep: int) -> tuple[list[float], dict]:
        """Each rank scores its share of `source` on the training device with the current (EMA)
        weights in eval.precision; sums are all-reduced (every image once) -> (means of psnr, ssim,
        blurred psnr, blurred ssim, then the count), settings. Triptychs of the first `keep` images."""
        import torch

        from harness.data.stream import eval_loader
        from harness.infer import deblur, evaluate
        from harness.metrics import psnr

        e = self.recipe.eval
        self.eval_model.load_state_dict(self._eval_weights())
        pairs = eval_loader(source, rank=self.world.rank, world_size=self.world.size, max_images=max_images)
        kept: list = []
        sums = [0.0] * 6
        if len(pairs):
            res = evaluate(self.eval_model, _keep_first(pairs, keep, kept), ensemble=e.ensemble,
                           precision=e.precision, batch=e.batch)
            sums = [v * res.count for v in (res.psnr, res.ssim, res.blurred_psnr, res.blurred_ssim,
                                            res.seconds_per_image)] + [float(res.count)]
        *totals, count = distributed.all_sum(sums)
        if kept:
            with torch.no_grad():
                items = []
                for p in kept:
                    restored = deblur(self.eval_model, p.blur[None], precision=e.precision)[0].cpu()
                    items.append((p.key, p.blur, restored, p.sharp, float(psnr(restored[None], p.sharp[None])[0])))
            self.tracker.log_triptychs(items, step=self.state.step)
        self.engine.train()
        means = [t / count for t in totals[:4]]
        settings = {"device": str(next(self.eval_model.parameters()).device), "precision": e.precision,
                    "ensemble": _ensemble_name(self.recipe), "protocol": EVAL_PROTOCOL,
                    "seconds_per_image": totals[4] / count}
        return [*means, count], settings

    def _eval_weights(self) -> dict:
        """What validation and test scoring load: the EMA weights, or the fp32 weights export writes.
        Under bf16/fp16 the module holds rounded copies: the optimizer's fp32 master weights are
        gathered instead (collective), so the scores equal `mimo eval` of the exported weights."""
        if self.ema is not None:
            return self.ema.model.state_dict()
        module = self.engine.module
        weights = {k: v.float() for k, v in module.state_dict().items()}
        if self.recipe.train.precision != "fp32":
            from deepspeed.utils import safe_get_full_fp32_param

            for name, param in module.named_parameters():
                master = safe_get_full_fp32_param(param)
                if master is not None:
                    weights[name] = master
        return weights

    def save(self, *, best: bool) -> Path:
        # Each part saves its own state: the loop counters, the tracker (its MLflow run id; during
        # an outage its queue goes to the offline file, so a kill from here on loses no record),
        # every rank's loader position, the EMA weights.
        shared = {"state": asdict(self.state), "recipe": self.recipe.model_dump(mode="json"),
                  "tracker": self.tracker.state_dict()}
        prune = self.state.step == 0 or self.engine.was_step_applied()
        tag_dir = checkpoint.save(self.engine, self.ckpt_dir, self.state.step, shared=shared,
                                  per_rank={"loader": self.loader.state_dict()},
                                  # Mid-way through non-finite (skipped) steps, no older tag is deleted.
                                  keep=self.recipe.checkpoint.keep if prune else None,
                                  ema=self.ema, best=best,
                                  protect=self._protect)
        self._protect = None  # the resumed tag is prunable once a newer one is complete
        self.log_event("checkpoint", step=self.state.step, tag=tag_dir.name)
        return tag_dir

    # -- the end -------------------------------------------------------------------------

    def finish(self, perf: dict) -> dict:
        """Export the final weights, write summary.json (rank 0) and close tracking."""
        if self.recipe.data.test and not self.stop_requested:
            self.test()  # collective: every rank scores its share
        metrics = getattr(self, "last_metrics", {})
        test = getattr(self, "test_metrics", {})
        summary = {"final_step": self.state.step, "total_steps": self.total, "stopped": self.stop_requested,
                   "val_psnr": metrics.get("val_psnr"), "val_ssim": metrics.get("val_ssim"),
                   "blurred_psnr": metrics.get("blurred_psnr"),
                   **{k: test.get(k) for k in ("test_psnr", "test_ssim", "test_blurred_psnr", "test_images")},
                   "eval": {"precision": self.recipe.eval.precision, "ensemble": _ensemble_name(self.recipe),
                            "device": str(self.engine.device), "protocol": EVAL_PROTOCOL},
                   "best_psnr": self.state.best_psnr if self.state.best_step >= 0 else None,
                   "best_step": self.state.best_step if self.state.best_step >= 0 else None,
                   "skipped_steps": self.state.skipped, "world_size": self.world.size, **perf,
                   "checkpoint": None, "run_dir": str(self.run_dir),
                   "mlflow_run_id": self.tracker.run_id or self.saved_tracker.get("run_id"),
                   "mlflow_run_url": self.tracker.run_url}
        if self.world.is_main and not self.stop_requested:
            weights = checkpoint.export(self.run_dir, self.run_dir / WEIGHTS, ema=self.ema is not None)
            summary["checkpoint"] = str(weights)
            self.tracker.log_artifact(self.run_dir / LOG)
            self._register(weights, summary)
        if self.world.is_main:
            with atomic_write(self.run_dir / SUMMARY) as tmp:
                tmp.write_text(json.dumps(summary, indent=2))
        self.tracker.close("KILLED" if self.stop_requested else "FINISHED")
        if self.world.is_main:
            print(console.summary_block(summary, scores=self.scores), file=sys.stderr, flush=True)
        distributed.barrier()
        return summary

    def _register(self, weights: Path, summary: dict) -> None:
        """Log the model. The registry compares the final test PSNR (the field's shared number) and
        crowns no model below its blurred test input; a recipe without a test set registers its
        last validation PSNR, as before."""
        if summary["test_psnr"] is not None:
            self.tracker.log_model(weights, summary["test_psnr"], blurred_psnr=summary["test_blurred_psnr"],
                                   metric="test_psnr")
        elif summary["val_psnr"] is not None:
            self.tracker.log_model(weights, summary["val_psnr"])


def run(recipe: Recipe, run_dir: str | os.PathLike | None, *, resume: str = "auto", callbacks=None) -> dict:
    """Train `recipe` into `run_dir` (collective: call on every rank); returns the summary dict."""
    job = Run(recipe, Path(run_dir) if run_dir else None, resume, callbacks)
    try:
        job.build()
        job.start_tracking()
        try:
            perf = job.train()
        except BaseException:
            if getattr(job, "bar", None) is not None:
                job.bar.close()  # ends the progress line: an error is a line of its own
            job.tracker.close("FAILED")
            job.loader.close()
            raise
        job.loader.close()
        return job.finish(perf)
    finally:
        job.release()  # the run dir's lock (rank 0): held until the summary is written


# ----------------------------------------------------------------------------- helpers


def _default_threads() -> int:
    """Share the cores between the ranks of this node instead of oversubscribing them."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or 1)
    return max(1, (os.cpu_count() or 1) // local)


def _agree_run_dir(run_dir: Path | None, recipe: Recipe, world) -> Path:
    """Rank 0 names the default run dir (a timestamp) and every rank uses that name."""
    import torch.distributed as dist

    if run_dir is None:
        name = [str(default_run_dir(recipe))]
        if dist.is_initialized():
            dist.broadcast_object_list(name, src=0)
        run_dir = Path(name[0])
    if world.is_main:
        check_writable(run_dir)
    distributed.barrier()
    return run_dir


def _find_resume(ckpt_dir: Path, resume: str) -> tuple[str | None, list[str]]:
    """(verified tag to resume from, lines to print): the newest that verifies (auto), none
    (never: refused when the run dir has checkpoints, which it would save over), or an explicit
    tag dir. Tags that fail verification are named, never loaded."""
    run_dir = ckpt_dir.parent
    if resume == "never":
        tags = checkpoint.complete_tags(ckpt_dir)
        if tags:
            raise HarnessError(f"--resume never: run dir {run_dir} already holds checkpoints (newest {tags[-1]}) "
                               f"that a fresh run would save over; continue it with --resume auto, or start "
                               f"fresh with another --run-dir (or delete {ckpt_dir})")
        return None, []
    if resume == "auto":
        tag, failed = checkpoint.newest_verified(ckpt_dir)
        if failed and tag is None:
            bad, why = next(iter(failed.items()))
            raise HarnessError(f"{ckpt_dir}: no checkpoint verifies ({len(failed)} fail; newest {bad}: {why}); "
                               "see `mimo checkpoints verify " f"{run_dir}`")
        return tag, [f"checkpoint {bad} fails verification ({why}); resuming from {tag}" for bad, why in failed.items()]
    path = Path(resume)
    problem = checkpoint.verify(path) if path.resolve().parent == ckpt_dir.resolve() else "not in this run dir"
    if problem:
        raise HarnessError(f"--resume {resume}: expected 'auto', 'never' or a checkpoint in {ckpt_dir} "
                           f"that verifies ({problem})")
    return path.name, []


def _on_main(world, fn, *, share: bool = True):
    """Collective: `fn()` on rank 0 only; every rank gets its result (None unless `share`) or
    raises its HarnessError (so the other ranks exit with rank 0's one line, not hang)."""
    result, error = None, None
    if world.is_main:
        try:
            result = fn()
        except HarnessError as exc:
            error = str(exc)
    shared, error = distributed.all_gather_object((result if share else None, error))[0]
    if error:
        raise HarnessError(error)
    return result if world.is_main else shared


def _normalized(raw: dict, where: str) -> dict:
    """A stored recipe with the defaults of fields added since it was written (not differences)."""
    try:
        return recipe_from_dict(raw, where).model_dump(mode="json")
    except HarnessError:
        return raw


def _ensemble_name(recipe: Recipe) -> str:
    from harness.infer import ensemble_mode

    return ensemble_mode(recipe.eval.ensemble) or "none"


def _keep_first(pairs, n: int, kept: list):
    """Pass pairs through, remembering the first `n` (for triptychs) without a second pass."""
    for i, pair in enumerate(pairs):
        if i < n:
            kept.append(pair)
        yield pair


def _loss_scale(engine) -> float | None:
    """fp16's dynamic loss scale (saved in and restored from checkpoints), None in bf16/fp32."""
    if not engine.fp16_enabled():
        return None
    return float(engine.optimizer.cur_scale)  # ZeRO 1/2 and DeepSpeed's FP16 optimizers alike


def _peak_memory_mb() -> float:
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _install_stop_handlers(job: Run) -> None:
    """SIGTERM/SIGUSR1 (Slurm preemption): finish the step, checkpoint on all ranks, exit 0."""

    def request(signum, frame):
        job.stop_requested_by_signal = True

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        try:
            signal.signal(sig, request)
        except ValueError:  # not the main thread (e.g. some Ray setups): no preemption handling
            pass


if __name__ == "__main__":
    sys.exit(main())
