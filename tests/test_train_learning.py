"""Learning: a tiny model trained for a few CPU minutes beats the *blurred input* on held-out pairs.

The bar is the blurred input's PSNR, not the step-0 model's: the residual head is not
zero-initialised, so the untrained model starts 1.5-6 dB below its input and merely learning to
pass the input through would already look like progress.
Setup (issue 5's reference, recipes/demo.yaml): easy preset (horizontal 4-8 px motion blur),
1 ResBlock per level, width 32, Adam 1e-3, batch 4, 64x64 crops, 800 steps, one process.
Issue 5 measured +1.26/+1.43/+1.64/+1.29 dB over the blurred input on 16 held-out 128x128 pairs
(4 seeds). This harness, seed 0, held-out gain at steps 100..800: +0.33 +0.57 +0.76 +0.99 +1.23
+1.20 +1.56 +1.60 dB (blurred input 21.74 dB; ~4.4 CPU minutes with a validation every 100
steps). We assert a margin safely below the worst seed: >= 0.75 dB.
"""

from __future__ import annotations

import json

import pytest

# ~2.5 minutes on 2 idle cores; the generous limits only guard against hangs on a busy machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

MARGIN_DB = 0.75


@pytest.fixture(scope="module")
def learning_shards(tmp_path_factory):
    from harness.data import pack, sources
    from harness.data.synth import synthesize

    root = tmp_path_factory.mktemp("learning")
    # Held-out pairs come from other scenes (another seed) than the training pairs.
    synthesize(root / "src", scenes=8, frames=8, size=(128, 128), seed=0, split="train", preset="easy")
    synthesize(root / "src", scenes=2, frames=8, size=(128, 128), seed=1, split="test", preset="easy")
    out = {}
    for split in ("train", "test"):
        pairs, unmatched = sources.list_gopro(root / "src", split)
        pack.pack(pairs, unmatched, root / split, source={"dataset": "gopro"}, split=split,
                  options=pack.PackOptions(samples_per_shard=16, encoding="raw"))
        out[split] = root / split
    return out


def test_tiny_model_beats_blurred_input_on_held_out_pairs(launch_train, learning_shards, tmp_path):
    run_dir = tmp_path / "run"
    launch = launch_train(["--recipe", "recipes/demo.yaml", "--run-dir", run_dir,
                           f"data.train={learning_shards['train']}", f"data.val={learning_shards['test']}",
                           "train.micro_batch=4", "train.threads=2", "eval.every=800", "eval.max_images=16",
                           "checkpoint.every=800"], nprocs=0)
    assert launch.run(2100) == 0, launch.output()[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_step"] == 800
    validation = [e for e in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines())
                  if e["event"] == "validation"][-1]
    assert validation["val_images"] == 16
    gain = summary["val_psnr"] - summary["blurred_psnr"]
    assert gain >= MARGIN_DB, f"restored {summary['val_psnr']:.2f} dB vs blurred {summary['blurred_psnr']:.2f} dB"
