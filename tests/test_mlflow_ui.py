"""The MLflow UI as a user sees it, in a real browser: a run made by `MlflowTracker` against a real
`mlflow server`, looked at in headless Chromium (cluster/system-deps.sh installs it) over the
DevTools protocol.

One tracked run, made cheaply (tiny tensors, a tiny model, no trainer, no DeepSpeed): the demo
recipe's params, train metrics every 5 steps, validations with triptychs at steps 20/40/60, a final
test score, the shard sets and the registered model. Then the pages a user opens, from the links
the harness prints: the experiment's runs (model-training mode, the datasets), the run's overview
(params, mimo.env.* tags), its Model metrics (sections train / val / test, each triptych in view at
its step once its card is scrolled past MLflow's list of run params, and at full size on a click)
and the logged model (its name, metrics with datasets, description).

`MIMO_UI_SCREENSHOTS=docs/screenshots pytest tests/test_mlflow_ui.py` also keeps the screenshots;
`-s` prints where the time went.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import re
import shutil
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import aiohttp
import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from harness.data.synth import synthesize
from harness.metrics import psnr
from harness.models import create_model, save_weights
from harness.recipe import TrackingCfg, load_recipe
from harness.tracking import MlflowTracker, dataset_tags
from harness.tracking.client import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG
from tests.conftest import REPO
from tests.fixtures.launch import stop_group
from tests.fixtures.system import require

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("clean_tracking_env")]

VALIDATIONS = (20, 40, 60)
STEPS = 60


# ---------------------------------------------------------------------------- the run


def _to_tensor(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255


def _shard_dir(root: Path, split: str, samples: int) -> Path:
    """A shard directory as `mimo pack` leaves it, reduced to what tracking reads: manifest.json."""
    folder = root / f"shards-{split}"
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {"format": "mimo-shards", "dataset": "synthetic-gopro", "split": split, "total_samples": samples,
                "shards": [{"name": f"{split}-000000.tar", "samples": samples}]}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return folder


def make_run(uri: str, work: Path, *, experiment: str, registered_model: str) -> MlflowTracker:
    """A small but complete training run's records, as the trainer sends them."""
    pairs = synthesize(work / "synth", scenes=2, frames=1, size=(96, 128), seed=3, split="val")
    frames = sorted(pairs.glob("scene_*/blur/*.png"))
    cfg = TrackingCfg(enabled=True, tracking_uri=uri, experiment=experiment, run_name="mimo-unet-synthetic",
                      registered_model=registered_model, log_every=5, images_every=1, system_metrics=False)
    tracker = MlflowTracker(cfg, work / "run")
    recipe = load_recipe(REPO / "recipes" / "demo.yaml").model_dump(mode="json")
    recipe["data"].update(train=str(work / "shards-train"), val=str(work / "shards-val"), test=str(work / "shards-test"))
    recipe["model"]["overrides"] = {"num_res": 1, "base_channels": 8}
    recipe["train"]["steps"] = STEPS
    tracker.log_params({**recipe, "world_size": 2, "gradient_accumulation": 1, "total_steps": STEPS})  # as train.py
    tracker.set_tags(dataset_tags(train=_shard_dir(work, "train", 200), val=_shard_dir(work, "val", 2),
                                  test=_shard_dir(work, "test", 2)))
    tracker.set_tags({"mimo.eval.device": "cpu", "mimo.eval.precision": "fp32", "mimo.eval.ensemble": "none"})
    for step in range(5, STEPS + 1, 5):
        loss = 0.08 * math.exp(-step / 30) + 0.02
        parts = {f"{kind}_{scale}": loss * w for scale in range(3) for kind, w in (("content", 0.3), ("fft", 0.03))}
        tracker.log_metrics({"step": step, "samples": step * 4, "loss": loss, "loss_rank0": loss * 1.01, **parts,
                             "lr": 1e-3, "grad_norm": 0.4 + 0.1 * math.cos(step), "images_per_sec": 41.5,
                             "data_wait": 0.02, "peak_mem_mb": 812.0, "skipped": 0, "loss_scale": 1.0}, step=step)
        if step in VALIDATIONS:
            gain = (0.15, 0.25, 0.32)[VALIDATIONS.index(step)]  # restored = part of the way to sharp
            items, blurred = [], []
            for path in frames:
                blur, sharp = _to_tensor(path), _to_tensor(path.parent.parent / "sharp" / path.name)
                restored = (blur + (sharp - blur) * gain).clamp(0, 1)  # stands in for the model's output
                items.append((f"{path.parent.parent.name}/{path.stem}", blur, restored, sharp,
                              float(psnr(restored[None], sharp[None])[0])))
                blurred.append(float(psnr(blur[None], sharp[None])[0]))
            val_psnr, blurred_psnr = sum(i[4] for i in items) / len(items), sum(blurred) / len(blurred)
            tracker.log_metrics({"val_psnr": val_psnr, "val_ssim": 0.70 + gain / 2, "blurred_psnr": blurred_psnr,
                                 "val_images": len(items), "val_seconds_per_image": 0.031}, step=step)
            tracker.log_triptychs(items, step=step)
    tracker.log_metrics({"test_psnr": val_psnr - 0.2, "test_ssim": 0.85, "test_blurred_psnr": blurred_psnr - 0.3,
                         "test_blurred_ssim": 0.68, "test_images": 2, "test_seconds_per_image": 0.03}, step=STEPS)
    torch.manual_seed(0)
    weights = save_weights(create_model("mimo-unet", base_channels=8, num_res=1), work / "weights.pkl")
    tracker.log_model(weights, val_psnr - 0.2, blurred_psnr=blurred_psnr - 0.3, metric="test_psnr")
    tracker.close()
    return tracker


# ---------------------------------------------------------------------------- the browser


class Chromium:
    """Headless Chromium, driven over its DevTools protocol (aiohttp's websocket client, which Ray
    brings): open a page, wait until the React app shows what the test waits for, read the page,
    click, take screenshots. Its own process group, stopped by PID."""

    def __init__(self, tmp: Path):
        profile = tmp / "chromium-profile"
        cmd = ["chromium", "--headless=new", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
               "--no-first-run", "--disable-extensions", "--remote-debugging-address=127.0.0.1",
               "--remote-debugging-port=0", f"--user-data-dir={profile}", f"--window-size={WIDTH},1200",
               "about:blank"]
        if os.geteuid() == 0:
            cmd.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(tmp / "chromium.log", "wb"),
                                     start_new_session=True)
        port_file = profile / "DevToolsActivePort"  # written once it listens (port 0: any free port)
        deadline = time.monotonic() + 30
        while not (port_file.is_file() and port_file.read_text().strip()):
            assert self.proc.poll() is None and time.monotonic() < deadline, (tmp / "chromium.log").read_text()[-2000:]
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as resp:
            self.ws_url = next(t["webSocketDebuggerUrl"] for t in json.load(resp) if t["type"] == "page")

    def stop(self) -> None:
        stop_group(self.proc, term_grace=5.0)


class Tab:
    """One page over the DevTools protocol: commands in order, one at a time."""

    def __init__(self, ws):
        self.ws, self.seq = ws, 0

    async def send(self, method: str, **params):
        self.seq += 1
        await self.ws.send_json({"id": self.seq, "method": method, "params": params})
        while True:
            msg = await self.ws.receive_json(timeout=60)
            if msg.get("id") == self.seq:
                assert "error" not in msg, f"{method}: {msg['error']}"
                return msg.get("result", {})

    async def js(self, expression: str):
        res = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in res, (expression[:300], res["exceptionDetails"])
        return res["result"].get("value")

    async def open(self, url: str, ready: str, *, height: int, timeout: float = 40.0) -> str:
        """Go to `url` in a WIDTH x `height` window (tall: the UI draws a chart only once it is in
        view) and wait until the JS expression `ready` holds -> the page's text."""
        await self.send("Emulation.setDeviceMetricsOverride", width=WIDTH, height=height, deviceScaleFactor=1,
                        mobile=False)
        await self.send("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            if await self.js(f"Boolean({ready})"):
                await asyncio.sleep(1.0)  # let the charts finish drawing
                return await self.text()
        raise AssertionError(f"{url}: {ready} not true after {timeout:.0f}s; the page says: {(await self.text())[:3000]}")

    async def text(self) -> str:
        return re.sub(r"\s+", " ", await self.js("document.body.innerText"))

    async def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode((await self.send("Page.captureScreenshot", format="png"))["data"]))
        return path


WIDTH = 1920

# JS: the compressed triptych images on the page -> [src, loaded and drawable]
IMAGES = ("[...document.images].filter(i => i.src.includes('compressed'))"
          ".map(i => [decodeURIComponent(i.src), i.complete && i.naturalWidth > 0])")


def keep_screenshots(*shots: Path) -> None:
    target = os.environ.get("MIMO_UI_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        for shot in shots:
            shutil.copy2(shot, Path(target) / shot.name)


async def look(server: str, tracker: MlflowTracker, experiment_id: str, model_id: str, ws_url: str, out: Path) -> dict:
    """Open the pages a user opens after a run -> what each shows (text, images); screenshots in `out`."""
    seen = {"times": []}
    t0 = time.monotonic()

    def mark(what: str) -> None:
        seen["times"].append(f"{what} {time.monotonic() - t0:.1f}s")

    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, max_msg_size=0) as ws:
        tab = Tab(ws)
        # A first visit opens MLflow's assistant panel over a third of the page: closed, as a user would.
        await tab.send("Page.navigate", url=f"{server}/health")
        await tab.js("localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
                     "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true')")
        query = tracker.run_url.rpartition("?")[2]  # what the harness's links carry: model-training mode
        seen["experiment"] = await tab.open(f"{server}/#/experiments/{experiment_id}?{query}",
                                            "document.body.innerText.includes('mimo-unet-synthetic')", height=900)
        await tab.screenshot(out / "experiment-runs.png")
        mark("experiment")
        seen["overview"] = await tab.open(tracker.run_url, "document.body.innerText.includes('synthetic-gopro-')",
                                          height=2000)
        await tab.screenshot(out / "run-overview.png")
        mark("overview")
        metrics_url = tracker.run_url.replace("?", "/model-metrics?")
        seen["metrics"] = await tab.open(metrics_url, f"{IMAGES}.filter(([src, ok]) => ok).length >= 6", height=4600)
        seen["images"] = await tab.js(IMAGES)
        await tab.screenshot(out / "model-metrics.png")
        mark("metrics")
        # MLflow 3.17 lists the run's params above each image in a card (its "Show run parameters",
        # on by default, per card and not kept): a user scrolls inside the card to the image.
        box = await tab.js("""(() => {
            const imgs = [...document.images].filter(i => i.src.includes('compressed'));
            imgs.forEach(i => i.scrollIntoView({block: 'nearest'}));  // inside each card only
            const cards = [...document.querySelectorAll('h4[title^="val/triptych_"]')].map(h => {
                let n = h; while (n && !n.querySelector('img')) n = n.parentElement; return n.getBoundingClientRect(); });
            const top = Math.min(...cards.map(r => r.top)), bottom = Math.max(...cards.map(r => r.bottom));
            const left = Math.min(...cards.map(r => r.left)), right = Math.max(...cards.map(r => r.right));
            return {x: left - 16, y: top - 56, width: right - left + 32, height: bottom - top + 72,
                    shown: imgs.filter(i => {  // wholly inside its card's scrolled body
                        const r = i.getBoundingClientRect();
                        let n = i.parentElement; while (n && n.scrollHeight <= n.clientHeight + 1) n = n.parentElement;
                        const c = n.getBoundingClientRect(); return r.height > 0 && r.top >= c.top - 1 && r.bottom <= c.bottom + 1; }).length};
            })()""")
        seen["cards"] = box.pop("shown")
        await asyncio.sleep(0.5)
        shot = await tab.send("Page.captureScreenshot", format="png", clip={**box, "scale": 1})
        (out / "triptych-cards.png").write_bytes(base64.b64decode(shot["data"]))
        # Clicking an image opens it at full size: the caption reads there.
        key = f"val/triptych_scene_000_000000_step{VALIDATIONS[-1]:07d}"
        clicked = await tab.js(f"""(() => {{
            let n = document.querySelector('h4[title="{key}"]');  // the card's title
            while (n && !n.querySelector('img')) n = n.parentElement;
            if (!n) return [...document.querySelectorAll('h4')].map(h => h.title);
            n.querySelector('img').click();
            return true; }})()""")
        assert clicked is True, f"{key} not among {json.dumps(clicked)}"
        preview = "[...document.querySelectorAll('.rc-image-preview img, [class*=preview] img')]"
        deadline = time.monotonic() + 20
        while not await tab.js(f"{preview}.some(i => i.complete && i.naturalWidth > 0 && !i.src.includes('compressed'))"):
            assert time.monotonic() < deadline, "clicking the triptych opened no full-size image"
            await asyncio.sleep(0.5)
        seen["preview"] = await tab.js(f"{preview}.filter(i => !i.src.includes('compressed'))"
                                       ".map(i => [decodeURIComponent(i.src), i.naturalWidth, i.naturalHeight])")
        await asyncio.sleep(1.0)
        box = await tab.js(f"""(() => {{ const r = {preview}.find(i => !i.src.includes('compressed')).getBoundingClientRect();
            return {{x: Math.max(0, r.left - 400), y: Math.max(0, r.top - 200), width: r.width + 800, height: r.height + 400}}; }})()""")
        shot = await tab.send("Page.captureScreenshot", format="png", clip={**box, "scale": 1})
        (out / "triptych-full-size.png").write_bytes(base64.b64decode(shot["data"]))
        mark("images")
        seen["model"] = await tab.open(f"{server}/#/experiments/{experiment_id}/models/{model_id}?{query}",
                                       "document.body.innerText.includes('test/psnr')", height=1600)
        await tab.screenshot(out / "logged-model.png")
        mark("model")
    return seen


# ---------------------------------------------------------------------------- the test


def test_run_metrics_images_datasets_and_model_in_the_browser(mlflow_server, tmp_path):
    require("chromium")
    t0 = time.monotonic()
    experiment, model = f"ui-{uuid.uuid4().hex[:8]}", f"deblur-{uuid.uuid4().hex[:8]}"
    tracker = make_run(mlflow_server, tmp_path, experiment=experiment, registered_model=model)
    client = mlflow.MlflowClient(mlflow_server, registry_uri=mlflow_server)
    exp = client.get_experiment_by_name(experiment)
    assert exp.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    [logged] = client.search_logged_models([exp.experiment_id])
    made = time.monotonic() - t0

    browser = Chromium(tmp_path)
    try:
        seen = asyncio.run(look(mlflow_server, tracker, exp.experiment_id, logged.model_id, browser.ws_url, tmp_path))
    finally:
        browser.stop()
    shots = ("experiment-runs.png", "run-overview.png", "model-metrics.png", "triptych-cards.png",
             "triptych-full-size.png", "logged-model.png")
    keep_screenshots(*(tmp_path / name for name in shots))

    # The experiment: model-training mode (its runs table, not GenAI's traces and judges), datasets.
    page = seen["experiment"]
    assert "Model registry" in page and "Judges" not in page and "Detect Issues" not in page, page[:1500]
    for name, context in (("train", "train"), ("val", "validation"), ("test", "test")):  # Dataset column
        assert re.search(rf"synthetic-gopro-{name} \([0-9a-f]{{16}}\) {context}\b", page, re.I), (name, page[:2000])

    # The run's overview: a dataset (+ the other two), the recipe's params, env.* as tags.
    page = seen["overview"]
    assert "synthetic-gopro-test" in page and "+2" in page
    assert "optim.lr" in page and "mimo.env.torch" in page and " env.torch" not in page

    # Model metrics: a section per prefix, nothing left without one; each triptych at its step.
    page = seen["metrics"]
    sections = dict(re.findall(r"\b(train|val|test|Model metrics) \((\d+)\)", page))
    assert sections == {"test": "5", "train": "14", "val": str(4 + 2 * len(VALIDATIONS)), "Model metrics": "0"}, sections
    assert "lr_x1e6" in page and "No image logged at this step" not in page
    images = seen["images"]
    assert len(images) == 2 * len(VALIDATIONS) and all(ok for _, ok in images), images
    for step in VALIDATIONS:  # one card per image and step, each showing the image logged at it
        assert sorted(f"_step{step:07d}+step+{step}+" in src for src, _ in images).count(True) == 2, (step, images)
    assert seen["cards"] == len(images), seen["cards"]  # in view once each card is scrolled to its image
    [(src, width, height)] = seen["preview"]  # the full-size PNG of the step-60 card
    assert f"_step{VALIDATIONS[-1]:07d}+step+{VALIDATIONS[-1]}+" in src and re.search(r"\.png(&|$)", src), src
    assert width == 2 * 128 and height > 2 * 96, (width, height)  # 2 x 2 frames of 96 x 128 over the caption

    # The logged model: named after its architecture, its final metrics (with their datasets), a description.
    page = seen["model"]
    assert logged.name == "mimo-unet" and "mimo-unet" in page
    assert "MIMO-UNet (base_channels=8, num_res=1) deblurring model, trained 60 steps" in page
    assert "test/psnr" in page and "val/psnr" in page and "synthetic-gopro-test" in page
    assert {m.key for m in logged.metrics} >= {"val/psnr", "val/ssim", "test/psnr", "test/ssim", "train/loss"}

    # What the pages showed, from the API: names, counters as tags, no env.* params, datasets.
    run = client.get_run(tracker.run_id)
    assert not any(k.startswith("env.") for k in run.data.params) and "optim.lr" in run.data.params
    assert run.data.tags["mimo.env.torch"] == torch.__version__
    assert run.data.metrics["train/lr_x1e6"] == pytest.approx(1000.0)
    assert not {"step", "samples", "skipped", "val_images", "test_images"} & set(run.data.metrics)
    assert all("/" in k for k in run.data.metrics), sorted(run.data.metrics)
    assert run.data.tags["mimo.val.images"] == "2" and run.data.tags["mimo.train.skipped_steps"] == "0"
    contexts = {i.dataset.name: next(t.value for t in i.tags if t.key == "mlflow.data.context")
                for i in run.inputs.dataset_inputs}
    assert contexts == {"synthetic-gopro-train": "train", "synthetic-gopro-val": "validation",
                        "synthetic-gopro-test": "test"}
    digests = {i.dataset.name: i.dataset.digest for i in run.inputs.dataset_inputs}
    assert digests["synthetic-gopro-test"] == run.data.tags["dataset.test.manifest_sha256"][:16]
    took = time.monotonic() - t0
    print(f"made the run in {made:.0f}s; the browser: {', '.join(seen['times'])}; all {took:.0f}s")  # with -s


def test_an_existing_experiment_without_a_kind_gets_the_model_training_kind(mlflow_server, tmp_path):
    """Experiments made before the harness tagged them (or by hand) get the tag on the next run; a
    kind someone chose (the UI sets the tag when a user switches) is left alone."""
    client = mlflow.MlflowClient(mlflow_server, registry_uri=mlflow_server)
    name = f"old-{uuid.uuid4().hex[:8]}"
    experiment_id = client.create_experiment(name)
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(experiment_id).tags
    cfg = TrackingCfg(enabled=True, tracking_uri=mlflow_server, experiment=name, run_name="t",
                      registered_model=None, system_metrics=False)
    tracker = MlflowTracker(cfg, tmp_path / "a", log_environment=False)
    tracker.close()
    assert client.get_experiment(experiment_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert tracker.run_url.endswith(f"/#/experiments/{experiment_id}/runs/{tracker.run_id}?workflowType=machine_learning")
    client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, "genai_development")
    MlflowTracker(cfg, tmp_path / "b", log_environment=False).close()
    assert client.get_experiment(experiment_id).tags[EXPERIMENT_KIND_TAG] == "genai_development"
