"""Recipes: schema, overrides, batch arithmetic, DeepSpeed config, and one-line errors before launch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from harness.errors import HarnessError
from harness.recipe import (
    batch_split,
    check_data,
    deepspeed_config,
    load_recipe,
    lr_factor_fn,
    to_steps,
    total_steps,
)
from tests.conftest import REPO

RECIPES = REPO / "recipes"


@pytest.mark.parametrize("name", ["plus", "base", "reds", "smoke", "demo"])
def test_shipped_recipes_validate(name):
    recipe = load_recipe(RECIPES / f"{name}.yaml")
    assert recipe.name == name
    assert total_steps(recipe) > 0
    # Each shipped recipe says where its numbers come from.
    assert (RECIPES / f"{name}.yaml").read_text().startswith("# ")


def test_plus_reproduces_the_paper_schedule_at_any_world_size():
    recipe = load_recipe(RECIPES / "plus.yaml")
    assert recipe.model.name == "mimo-unet-plus" and recipe.train.precision == "bf16"
    assert recipe.train.zero_stage == 1 and recipe.optim.lr == 1e-4 and recipe.train.global_batch == 4
    # 3000 epochs x 2103 pairs / global batch 4, independent of the number of ranks.
    assert total_steps(recipe) == 1_577_250
    assert to_steps(recipe, 500) == 262_875
    factor = lr_factor_fn(recipe)
    assert factor(0) == 1.0 and factor(262_874) == 1.0 and factor(262_875) == 0.5
    assert factor(1_577_249) == 0.5**5
    for world, (micro, accum) in {1: (4, 1), 2: (2, 1), 4: (1, 1)}.items():
        assert batch_split(recipe, world) == (micro, accum)
        ds = deepspeed_config(recipe, world)
        assert ds["train_batch_size"] == 4 and ds["train_micro_batch_size_per_gpu"] == micro
        assert ds["bf16"]["enabled"] and ds["zero_optimization"]["stage"] == 1
    with pytest.raises(HarnessError, match=r"plus\.yaml: train\.global_batch: 4 is not divisible"):
        batch_split(recipe, 3)


def test_accumulation_follows_world_size_and_overrides_apply():
    recipe = load_recipe(RECIPES / "smoke.yaml", ["train.micro_batch=1", "optim.lr=2e-4", "train.precision=fp16",
                                                  "deepspeed.fp16.initial_scale_power=8"])
    assert recipe.optim.lr == 2e-4
    assert batch_split(recipe, 1) == (1, 4) and batch_split(recipe, 2) == (1, 2) and batch_split(recipe, 4) == (1, 1)
    ds = deepspeed_config(recipe, 2)
    assert ds["gradient_accumulation_steps"] == 2
    # The expert `deepspeed:` section is merged over the generated config.
    assert ds["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 8}


def test_cosine_schedule_warms_up_and_decays():
    recipe = load_recipe(RECIPES / "smoke.yaml", ["schedule.name=cosine", "schedule.warmup=4", "train.steps=104",
                                                  "schedule.min_lr=1e-4"])
    f = lr_factor_fn(recipe)
    assert f(0) == pytest.approx(0.25) and f(3) == pytest.approx(1.0) and f(4) == pytest.approx(1.0)
    assert f(54) == pytest.approx(0.55) and f(104) == pytest.approx(0.1)


@pytest.mark.parametrize("override, expected", [
    (["optim.learning_rate=1"], r"smoke\.yaml: optim\.learning_rate: unknown field"),
    (["train.precision=fp8"], r"smoke\.yaml: train\.precision: Input should be 'bf16', 'fp16' or 'fp32'"),
    (["data.crop=30"], r"smoke\.yaml: data\.crop: Input should be a multiple of 4"),
    (["train.epochs=3"], r"smoke\.yaml: train: set exactly one of train\.steps and train\.epochs"),
    (["train.zero_stage=3"], r"smoke\.yaml: train\.zero_stage"),
    (["optim"], r"override 'optim': expected key\.path=value"),
])
def test_bad_fields_name_field_and_file(override, expected):
    with pytest.raises(HarnessError, match=expected):
        load_recipe(RECIPES / "smoke.yaml", override)


def test_data_paths_resolve_against_recipe_then_cwd(tmp_path, train_shards, monkeypatch):
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text((RECIPES / "smoke.yaml").read_text().replace("../demo/shards/train", "train")
                           .replace("../demo/shards/test", "test"))
    monkeypatch.chdir(train_shards["train"].parent)  # relative to CWD when not beside the recipe
    recipe = load_recipe(recipe_file)
    assert recipe.data.train == str(train_shards["train"])
    check_data(recipe)
    (tmp_path / "train").mkdir()  # beside the recipe wins -- and this one has no manifest
    with pytest.raises(HarnessError, match=r"r\.yaml: data\.train: .*manifest"):
        check_data(load_recipe(recipe_file))


def _train_script(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "harness" / "train.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_preflight_errors_are_one_line_before_any_rank_starts(tmp_path, train_shards):
    data = [f"data.train={train_shards['train']}", f"data.val={train_shards['test']}"]
    ok = _train_script("--recipe", "recipes/smoke.yaml", "--dry-run", "--run-dir", str(tmp_path / "run"), *data)
    assert ok.returncode == 0, ok.stderr
    assert "ok: recipes/smoke.yaml (20 steps" in ok.stdout

    missing = _train_script("--recipe", "recipes/smoke.yaml", "--dry-run", f"data.train={tmp_path}/nope")
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        f"train: error: recipes/smoke.yaml: data.train: {tmp_path}/nope does not exist "
        "(expected a shard directory with manifest.json or a .tar pattern)"]

    gone = tmp_path / "gone"  # a manifest whose shard file was deleted
    gone.mkdir()
    (gone / "manifest.json").write_text((train_shards["train"] / "manifest.json").read_text())
    torn = _train_script("--recipe", "recipes/smoke.yaml", "--dry-run", f"data.train={gone}", *data[1:])
    assert torn.returncode == 2 and len(torn.stderr.strip().splitlines()) == 1
    assert f"data.train: shard {gone}/train-000000.tar does not exist (and 3 more)" in torn.stderr

    blocker = tmp_path / "file"
    blocker.write_text("")
    unwritable = _train_script("--recipe", "recipes/smoke.yaml", "--run-dir", str(blocker / "run"), *data)
    assert unwritable.returncode == 2
    assert unwritable.stderr.strip().splitlines() == [f"train: error: run dir {blocker}/run: not writable (Not a directory)"]

    bad = subprocess.run([sys.executable, "-m", "harness", "train", "--recipe", "recipes/smoke.yaml", "--nprocs", "2",
                          "train.global_batch=3", *data], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "mimo train: error: recipes/smoke.yaml: train.global_batch: 3 is not divisible by "
        "train.micro_batch (2) x world size (2)"]


def test_recipes_inherit_with_base_and_overrides(tmp_path):
    """`base:` + `overrides:` (as tune recipes): base.yaml is plus.yaml with the smaller model."""
    plus, base = (load_recipe(REPO / "recipes" / f"{n}.yaml").model_dump(mode="json") for n in ("plus", "base"))
    assert base["model"]["name"] == "mimo-unet" and plus["model"]["name"] == "mimo-unet-plus"
    assert base["name"] == "base"  # named after its own file, not its base
    assert {k: v for k, v in base.items() if k not in ("model", "name")} == \
        {k: v for k, v in plus.items() if k not in ("model", "name")}
    reds = load_recipe(REPO / "recipes/reds.yaml")
    assert reds.train.steps == 1577250 and reds.train.epochs is None and reds.schedule.unit == "steps"
    assert reds.data.train.endswith("shards/reds/train")

    (tmp_path / "a.yaml").write_text(f"base: {REPO / 'recipes/smoke.yaml'}\noverrides: [train.steps=7]\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\noverrides: [optim.lr=0.5]\nname: bee\n")
    b = load_recipe(tmp_path / "b.yaml", ["train.seed=3"])  # a chain of bases, then the command line
    assert (b.train.steps, b.optim.lr, b.train.seed, b.name) == (7, 0.5, 3, "bee")

    (tmp_path / "c.yaml").write_text("base: d.yaml\n")
    (tmp_path / "d.yaml").write_text("base: c.yaml\n")
    with pytest.raises(HarnessError, match=r"c\.yaml: base: d\.yaml leads back to c\.yaml"):
        load_recipe(tmp_path / "c.yaml")
    (tmp_path / "e.yaml").write_text("base: a.yaml\ntrain: {steps: 3}\n")
    with pytest.raises(HarnessError, match=r"e\.yaml: train: a recipe with `base:` holds only base, overrides"):
        load_recipe(tmp_path / "e.yaml")
    (tmp_path / "f.yaml").write_text("base: a.yaml\noverrides: {train.steps: 3}\n")
    with pytest.raises(HarnessError, match=r"f\.yaml: overrides: expected a list of 'key.path=value' strings"):
        load_recipe(tmp_path / "f.yaml")
