"""Bad input to the facade gets SPEC §2.5's error shape and starts no flow run (real stack)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hostile_inputs import data_uri, small_jpeg
from stackserver import KEYS, RunningStack

GOOD = {"instance_prompt": "photo of sks person", "base_model_id": "tiny",
        "images": ["https://example.com/a.jpg"]}


def _assert_error(response, status_code: int, message: str | None = None) -> dict:  # noqa: ANN001
    assert response.status_code == status_code, response.text
    body = response.json()
    assert body["status"] == "error"
    assert body["messege"] == body["message"]
    if message is not None:
        assert body["messege"] == message
    return body


@pytest.mark.parametrize(
    ("path", "payload", "headers", "code", "message"),
    [
        ("/api/v3/lora_fine_tune", GOOD, {}, 401, "Invalid Api Key"),
        ("/api/v3/lora_fine_tune", {**GOOD, "key": "wrong"}, {}, 401, "Invalid Api Key"),
        ("/api/v3/lora_fine_tune", GOOD, {"Authorization": "Bearer wrong"}, 401, "Invalid Api Key"),
        ("/api/v3/fine_tune_status/abc1234567", {}, {}, 401, "Invalid Api Key"),
        ("/api/v3/finetune_list", {"key": ""}, {}, 401, "Invalid Api Key"),
        ("/api/v3/fine_tune_status/NoSuchId00", {"key": KEYS[0]}, {}, 404, "Model id not found"),
        ("/api/v3/fine_tune_status/..%2F..%2Fetc", {"key": KEYS[0]}, {}, 404, None),
    ],
)
def test_auth_and_unknown_ids(stack: RunningStack, path: str, payload: dict, headers: dict, code: int,
                              message: str | None) -> None:
    before = stack.flow_run_count()
    with stack.client() as client:
        _assert_error(client.post(path, json=payload, headers=headers), code, message)
    assert stack.flow_run_count() == before


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({**GOOD, "images": []}, "images"),
        ({k: v for k, v in GOOD.items() if k != "images"}, "images"),
        ({**GOOD, "images": ["file:///etc/passwd"]}, "images"),
        ({**GOOD, "instance_prompt": ""}, "instance_prompt"),
        ({**GOOD, "seed": "not-a-number"}, "seed"),
        ({**GOOD, "seed": True}, "seed"),  # pydantic alone reads true as seed 1
        ({**GOOD, "max_train_steps": True}, "max_train_steps"),
        ({**GOOD, "max_train_steps": "999999"}, "max_train_steps"),
        ({**GOOD, "base_model_id": "no-such-model"}, "base_model_id"),
        ({**GOOD, "training_type": "dog"}, "training_type"),
        ({**GOOD, "webhook": "ftp://x"}, "webhook"),
        ({**GOOD, "images": ["data:image/png;base64,aGVsbG8gd29ybGQ="]}, "images"),  # "hello world"
        ({**GOOD, "images": ["data:image/png;base64,%%%not-base64"]}, "images"),
        ({**GOOD, "images": [data_uri(small_jpeg(8), "image/jpeg")]}, "images"),  # too small to train on
        ({**GOOD, "images": ["http://"]}, "images"),  # no host
        ({**GOOD, "images": ["https://exa mple .com/<>"]}, "images"),
        ({**GOOD, "images": ["https://example.com:99999/a.jpg"]}, "images"),
        ({**GOOD, "webhook": "http://[::1"}, "webhook"),  # these two were 500s once
        ({**GOOD, "webhook": "https://[zz]/hook"}, "webhook"),
    ],
)
def test_invalid_create_requests_start_nothing(stack: RunningStack, payload: dict, field: str) -> None:
    before = stack.flow_run_count()
    with stack.client() as client:
        body = _assert_error(client.post("/api/v3/lora_fine_tune", json={"key": KEYS[0], **payload}), 400)
    assert field in body["errors"], body
    assert stack.flow_run_count() == before


def test_malformed_bodies_are_400_not_500(stack: RunningStack) -> None:
    with stack.client() as client:
        for raw in (b"{not json", b"[1, 2]", b'"a string"'):
            _assert_error(client.post("/api/v3/lora_fine_tune", content=raw,
                                      headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEYS[0]}"}), 400)


def test_form_encoded_body_is_accepted(stack: RunningStack) -> None:
    with stack.client() as client:
        response = client.post("/api/v3/finetune_list", data={"key": KEYS[0]})
    assert response.status_code == 200 and response.json()["messege"] == "model list"


def test_api_package_imports_no_torch_diffusers_or_tasks() -> None:
    code = (
        "import sys, api.app, api.routes, api.gateway, api.status, api.files;"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'peft', 'tasks', 'PIL')];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
