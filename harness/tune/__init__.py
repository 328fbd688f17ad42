"""Ray Tune over training recipes: `python -m harness.tune --recipe recipes/tune-plus.yaml [k=v ...]`.

- `spec.py`        the tune recipe (`base:` + `overrides:` + `search:`) in pydantic, checked value by
                   value against the training recipe before Ray starts -> `TuneSpec`.
- `trial.py`       one trial: the trainer (`harness.train.run`) in the trial's process or as a Ray
                   Train TorchTrainer; reports each validation with a pointer to its own checkpoint.
- `driver.py`      the command: Tuner / Tuner.restore, the ResultGrid -> results.csv, table, best recipe.
- `parent_run.py`  MLflow: the experiment's parent run, trial runs closed, best model registered.
Ray is imported only when a search runs, so `mimo tune --help` stays fast.
"""

from harness.tune.driver import add_arguments, execute, main

__all__ = ["add_arguments", "execute", "main"]
