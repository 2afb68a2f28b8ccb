"""End to end through the real stack: facade -> Prefect server -> process worker -> S3 (weed).

Nothing is mocked: real HTTP, real MTCNN, real diffusers/peft training on the tiny model.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from uuid import UUID

import httpx
import pytest

from flows.params import TrainingStatus
from prefectruns import wait_for_final, wait_for_log
from stackserver import KEYS, RunningStack, data_uri, prefect_request
from tasks.sample_photos import write_sample_photos

ORDER = [s.value for s in TrainingStatus]
PROMPT = "photo of sks person"


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_sample_photos(tmp_path_factory.mktemp("photos"), count=4)


@pytest.fixture(scope="module")
def photo_server(photos: list[Path]) -> Iterator[str]:
    """Serve the photos over real HTTP on loopback, like a client's image host."""
    handler = partial(SimpleHTTPRequestHandler, directory=str(photos[0].parent))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_lora_training_from_rest_call_to_loadable_weights(
    stack: RunningStack, photos: list[Path], photo_server: str, tmp_path: Path
) -> None:
    images = [f"{photo_server}/{photos[0].name}", *(data_uri(p) for p in photos[1:])]
    with stack.client() as client:
        created = client.post("/api/v3/lora_fine_tune", json={
            "key": KEYS[0], "instance_prompt": PROMPT, "class_prompt": "photo of person",
            "base_model_id": "tiny", "images": images, "seed": "0", "training_type": "female",
            "max_train_steps": "40", "lora_type": "lora", "webhook": None, "some_unknown_field": 1,
        })
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["status"] == "success" and body["messege"] == "deploying_gpu"
    assert body["training_id"] == body["model_id"] and len(body["training_id"]) == 10
    assert body["data"].startswith("it will take upto ")

    status, seen = stack.wait_until_done(body["training_id"], KEYS[0])
    assert status["training_status"] == "model_ready", status
    assert status["messege"] == "model_ready" and status["error"] is None
    assert status["progress"] == {"step": 40, "total_steps": 40, "percent": 100.0}
    assert seen == sorted(seen, key=ORDER.index), f"statuses went backwards: {seen}"
    assert seen[-1] == "model_ready" and len(seen) >= 3

    links = status["links"]
    assert set(links) >= {"lora_diffusers", "lora_kohya", "samples"} and len(links["samples"]) == 2
    diffusers_file = _download(links["lora_diffusers"], tmp_path / "pytorch_lora_weights.safetensors")
    kohya_file = _download(links["lora_kohya"], tmp_path / "kohya.safetensors")
    assert httpx.get(status["test_image"], timeout=10).content[:8] == b"\x89PNG\r\n\x1a\n"

    manifest = json.loads(stack.store.get_bytes(f"trainings/{body['training_id']}/manifest.json"))
    assert manifest["files"]["lora_diffusers"]["sha256"] == hashlib.sha256(diffusers_file.read_bytes()).hexdigest()
    assert manifest["files"]["lora_kohya"]["sha256"] == hashlib.sha256(kohya_file.read_bytes()).hexdigest()
    assert "images" not in manifest["parameters"] and "webhook" not in manifest["parameters"]
    assert {"fetch-images", "crop-faces", "train-model", "convert-weights", "make-samples"} <= set(manifest["stage_seconds"])
    run_id = UUID(stack.flow_run(body["training_id"])["id"])  # the samples took the trained UNet, no reload
    assert any("the UNet the training handed over" in line
               for line in wait_for_log(stack.settings.prefect_api, run_id, "samples: pipeline loaded"))
    # the stage libraries' own lines reach the run's log in the UI (checkpoint_every=25, the kohya export)
    messages = wait_for_log(stack.settings.prefect_api, run_id, "checkpoint at step 25")
    assert any(line.startswith("wrote kohya LoRA") for line in messages), messages
    # the samples rendered while the weights were converted and stored (the statuses stayed in order)
    tasks = sorted(prefect_request("POST", f"{stack.settings.prefect_api}/task_runs/filter",
                                   {"task_runs": {"flow_run_id": {"any_": [str(run_id)]}}}).json(),
                   key=lambda t: t["start_time"])
    samples = next(t for t in tasks if t["name"].startswith("make-samples"))
    model_upload = next(t for t in tasks if t["name"].startswith("upload-artifacts"))  # the first: weights
    assert samples["start_time"] < model_upload["end_time"], [(t["name"], t["start_time"], t["end_time"]) for t in tasks]

    from tasks.sampling import lora_output_difference
    from tasks.tiny_models import TINY_RESOLUTION, build_tiny_sd

    tiny = build_tiny_sd(tmp_path / "tiny")
    for lora in (diffusers_file, kohya_file):
        assert lora_output_difference(str(tiny), lora, PROMPT, seed=0, resolution=TINY_RESOLUTION) > 0.5

    # What a person sees on the run's page once it has ended (artifacts are created while the run goes on).
    assert wait_for_final(stack.settings.prefect_api, run_id).state.type.value == "COMPLETED"
    artifacts = {a["key"]: a for a in stack.artifacts(body["training_id"])}
    training = body["training_id"].lower()
    assert {f"model-summary-{training}", f"sample-grid-{training}", f"loss-curve-{training}",
            f"crop-report-{training}", f"contact-sheet-{training}", f"training-progress-{training}"} <= set(artifacts)
    assert artifacts[f"training-progress-{training}"]["data"] == 100.0
    summary = artifacts[f"model-summary-{training}"]["data"]
    assert "lora_kohya" in summary and "final loss" in summary
    loss_curve = httpx.get(artifacts[f"loss-curve-{training}"]["data"], timeout=10)
    assert loss_curve.content[:8] == b"\x89PNG\r\n\x1a\n"


def test_dreambooth_v2_gives_a_single_file_checkpoint_that_diffusers_loads(
    stack: RunningStack, photos: list[Path], tmp_path: Path
) -> None:
    import torch

    with stack.client() as client:
        created = client.post("/api/v3/fine_tune_v2", json={
            "key": KEYS[0], "instance_prompt": PROMPT, "class_prompt": "photo of person", "base_model_id": "tiny",
            "images": [data_uri(p) for p in photos[:2]], "seed": "0", "training_type": "women",
            "learning_rate_unet": "1e-3", "steps_unet": "8", "learning_rate_text_encoder": None,
            "steps_text_encoder": "4", "webhook": None, "half_precision": "true",
        }).json()
    status, _ = stack.wait_until_done(created["training_id"], KEYS[0])
    assert status["training_status"] == "model_ready", status
    assert set(status["links"]) >= {"checkpoint", "diffusers", "samples", "loss_curve"}
    checkpoint = _download(status["links"]["checkpoint"], tmp_path / "model.safetensors")
    archive = _download(status["links"]["diffusers"], tmp_path / "model-diffusers.zip")
    import zipfile

    from safetensors.torch import load, load_file

    with zipfile.ZipFile(archive) as unzipped:  # half_precision: both exports are fp16
        unet = load(unzipped.read("unet/diffusion_pytorch_model.safetensors"))
        configs = {name: unzipped.read(name).decode() for name in unzipped.namelist() if name.endswith(".json")}
    # the configs name the base model by its id, not by this server's folders
    assert json.loads(configs["model_index.json"])["_name_or_path"] == "tiny"
    assert not [name for name, text in configs.items() if str(stack.settings.resolved_data_dir) in text]
    assert {t.dtype for t in unet.values()} == {t.dtype for t in load_file(str(checkpoint)).values()} == {torch.float16}

    from diffusers import StableDiffusionPipeline

    from tasks.tiny_models import TINY_RESOLUTION, build_tiny_sd

    tiny = build_tiny_sd(tmp_path / "tiny")
    tuned = StableDiffusionPipeline.from_single_file(str(checkpoint), config=str(tiny), local_files_only=True)
    base = StableDiffusionPipeline.from_pretrained(tiny)
    images = [pipe(PROMPT, num_inference_steps=3, height=TINY_RESOLUTION, width=TINY_RESOLUTION, output_type="np",
                   generator=torch.Generator().manual_seed(0)).images for pipe in (base, tuned)]
    assert abs(images[0] - images[1]).mean() * 255 > 0.5  # the fine-tuned weights are in the file


def test_lycoris_training_exports_the_a1111_layout(stack: RunningStack, photos: list[Path], tmp_path: Path) -> None:
    with stack.client() as client:
        created = client.post("/api/v3/lora_fine_tune", json={
            "key": KEYS[0], "instance_prompt": PROMPT, "base_model_id": "tiny", "lora_type": "lycoris",
            "images": [data_uri(p) for p in photos[:2]], "max_train_steps": "6", "training_type": "men",
        }).json()
    status, _ = stack.wait_until_done(created["training_id"], KEYS[0])
    assert status["training_status"] == "model_ready", status
    from safetensors import safe_open

    lycoris = _download(status["links"]["lora_kohya"], tmp_path / "lycoris.safetensors")
    with safe_open(str(lycoris), "pt") as handle:
        keys = set(handle.keys())
        metadata = handle.metadata()
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert any(k.endswith(".hada_w1_a") for k in keys) and any(k.endswith(".alpha") for k in keys)
    assert metadata["ss_network_module"] == "lycoris.kohya"
    # diffusers reads neither LoHa file: the peft one is not offered under a diffusers name, and peft loads it
    assert "lora_diffusers" not in status["links"]
    peft_file = _download(status["links"]["lycoris_peft"], tmp_path / "pytorch_lycoris_weights.safetensors")
    from tasks.sampling import lora_output_difference
    from tasks.tiny_models import TINY_RESOLUTION, build_tiny_sd

    assert lora_output_difference(str(build_tiny_sd(tmp_path / "tiny")), peft_file, PROMPT, seed=0,
                                  resolution=TINY_RESOLUTION) > 0.0


def _download(url: str, dest: Path) -> Path:
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200, response.text
    dest.write_bytes(response.content)
    return dest


def test_list_shows_own_trainings_newest_first_and_hides_others(stack: RunningStack, photo_server: str) -> None:
    # Images that 404 make these runs end within seconds; the listing is what is checked here.
    request = {"instance_prompt": PROMPT, "base_model_id": "tiny", "images": [f"{photo_server}/missing.png"],
               "max_train_steps": 1, "training_type": "null"}
    with stack.client() as client:
        first = client.post("/api/v3/lora_fine_tune", json={"key": KEYS[1], **request}).json()["training_id"]
        second = client.post("/api/v3/lora_fine_tune", json={"key": KEYS[1], **request}).json()["training_id"]
        mine = client.post("/api/v3/finetune_list", json={"key": KEYS[1]}).json()
        theirs = client.post("/api/v3/finetune_list", headers={"Authorization": f"Bearer {KEYS[0]}"}).json()
        foreign = client.post(f"/api/v3/fine_tune_status/{first}", json={"key": KEYS[0]})
    assert mine["status"] == "success" and mine["messege"] == "model list"
    assert mine["data"][:2] == [second, first]
    assert first not in theirs["data"] and second not in theirs["data"]
    assert foreign.status_code == 404 and foreign.json()["messege"] == "Model id not found"
    for training_id in (first, second):
        stack.wait_until_done(training_id, KEYS[1])


def test_a_training_whose_images_all_fail_ends_failed_with_the_reason(stack: RunningStack, photo_server: str) -> None:
    with stack.client() as client:
        created = client.post("/api/v3/lora_fine_tune", json={
            "key": KEYS[0], "instance_prompt": PROMPT, "base_model_id": "tiny",
            "images": [f"{photo_server}/no-such-photo.jpg"],
        }).json()
    status, _ = stack.wait_until_done(created["training_id"], KEYS[0])
    assert status["training_status"] == "failed" and status["messege"] == "failed"
    assert "no-such-photo.jpg" in status["error"] and "404" in status["error"], status["error"]
    assert status["links"] == {} and status["test_image"] is None
