"""``dreamflow demo``: one LoRA training on bundled photos with the tiny model, through the REST API.

Starts the stack unless the facade already answers, sends the photos as ``data:`` URIs, shows a
progress bar until the model is ready, downloads both LoRA files through their links and shows
that each one loads into the tiny pipeline with diffusers and changes its output.
"""

from __future__ import annotations

import base64
import sys
import time
from pathlib import Path

import httpx

from deployments.stack import Stack, dev_key, start_stack
from flows.settings import Settings

POLL_S = 1.0
DONE = {"model_ready", "failed", "cancelled"}
BAR_WIDTH = 30
PROMPT = "photo of sks person"


def quiet_libraries() -> None:
    """Keep diffusers/transformers chatter (progress bars, notices) out of the demo's output."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def facade_answers(base: str, key: str) -> bool:
    try:
        return httpx.post(f"{base}/api/v3/finetune_list", json={"key": key}, timeout=3).status_code == 200
    except httpx.TransportError:
        return False


def show_progress(status: dict, started: float) -> None:
    """One line, redrawn in place: bar, status, step, ETA."""
    progress = status.get("progress") or {}
    percent = float(progress.get("percent") or 0.0)
    if status["training_status"] == "model_ready":
        percent = 100.0
    filled = int(BAR_WIDTH * percent / 100)
    eta = status.get("eta_seconds")
    line = (f"\r[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {percent:5.1f}%  {status['training_status']:<26}"
            f" step {progress.get('step', 0)}/{progress.get('total_steps', 0)}"
            f"  ETA {eta if eta is not None else '-'} s  elapsed {time.monotonic() - started:5.1f} s")
    sys.stdout.write(line)
    sys.stdout.flush()


def train_once(client: httpx.Client, key: str, photos: list[Path], steps: int) -> dict:
    """Create the training and poll it to its end; returns the final status."""
    created = client.post("/api/v3/lora_fine_tune", json={
        "key": key, "instance_prompt": PROMPT, "class_prompt": "photo of person", "base_model_id": "tiny",
        "images": [data_uri(p) for p in photos], "seed": 0, "training_type": "female",
        "max_train_steps": steps, "lora_type": "lora", "webhook": None,
    })
    created.raise_for_status()
    body = created.json()
    sys.stdout.write(f"training {body['training_id']} accepted: {body['data']}\n")
    started = time.monotonic()
    while True:
        status = client.post(f"/api/v3/fine_tune_status/{body['training_id']}", json={"key": key}).json()
        show_progress(status, started)
        if status.get("training_status") in DONE:
            sys.stdout.write("\n")
            return status
        time.sleep(POLL_S)


def download(client: httpx.Client, url: str, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    response = client.get(url)
    response.raise_for_status()
    dest.write_bytes(response.content)
    return dest


def check_lora_files(settings: Settings, status: dict, client: httpx.Client) -> None:
    """Download both LoRA files and show that each loads into the tiny pipeline and changes it."""
    from tasks.sampling import lora_output_difference
    from tasks.tiny_models import TINY_RESOLUTION, build_tiny_sd

    quiet_libraries()
    tiny = build_tiny_sd(settings.resolved_data_dir / "models" / "tiny")
    folder = settings.resolved_data_dir / "demo" / status["model_id"]
    for name, filename in (("lora_diffusers", "pytorch_lora_weights.safetensors"), ("lora_kohya", "kohya.safetensors")):
        path = download(client, status["links"][name], folder / filename)
        diff = lora_output_difference(str(tiny), path, PROMPT, seed=0, resolution=TINY_RESOLUTION)
        verdict = "changes the output" if diff > 0.5 else "DOES NOT change the output"
        sys.stdout.write(f"  {name}: {path} ({path.stat().st_size} bytes) loads with diffusers and {verdict}"
                         f" (mean |diff| {diff:.2f}/255 against the base model, same seed)\n")


def run_demo(settings: Settings, steps: int = 60) -> int:
    """Run the demo; 0 when the model came out ready and loadable."""
    from tasks.sample_photos import write_sample_photos

    key = dev_key(settings)
    base = f"http://{settings.api_host}:{settings.api_port}"
    stack: Stack | None = None
    began = time.monotonic()
    if not facade_answers(base, key):
        sys.stdout.write("starting the dreamflow stack (Prefect server, worker, facade)...\n")
        stack = start_stack(settings)
        sys.stdout.write(f"stack up in {time.monotonic() - began:.1f} s; Prefect UI {settings.prefect_api.removesuffix('/api')}\n")
    try:
        photos = write_sample_photos(settings.resolved_data_dir / "sample-photos")
        with httpx.Client(base_url=base, timeout=30) as client:
            status = train_once(client, key, photos, steps)
            if status["training_status"] != "model_ready":
                sys.stdout.write(f"training ended {status['training_status']}: {status.get('error')}\n")
                return 1
            sys.stdout.write("links:\n" + "".join(f"  {k}: {v}\n" for k, v in status["links"].items()))
            sys.stdout.write(f"  test_image: {status['test_image']}\n")
            check_lora_files(settings, status, client)
        sys.stdout.write(f"demo finished in {time.monotonic() - began:.1f} s\n")
        return 0
    finally:
        if stack is not None:
            stack.stop()
