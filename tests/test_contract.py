"""The Train Model API contract (SPEC §2) through the real stack: example requests of the original
documentation, exact response keys, cancel, delete, base64_crop, sandbox, idempotency, webhooks.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from api.examples import CREATE_EXAMPLES
from hostile_inputs import small_jpeg
from runguard import pool_paused
from stackserver import KEYS, WEBHOOK_SECRET, RunningStack, data_uri
from tasks.sample_photos import write_sample_photos

CREATED_KEYS = {"status", "messege", "data", "training_id", "model_id"}
STATUS_KEYS = {"status", "messege", "training_status", "data", "model_id", "progress", "eta_seconds", "error",
               "links", "test_image"}
ORDER = ["deploying_gpu", "training_started", "training_success", "trained_model_compressing",
         "trained_model_uploading", "trained_model_uploaded", "deploying_model", "model_ready"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_sample_photos(tmp_path_factory.mktemp("contract-photos"), count=3)


def example(name: str, photos: list[Path], **changes: object) -> dict:
    """An example body of the original docs, with our key and photos the stack can reach."""
    body = {**CREATE_EXAMPLES[name], "key": KEYS[0], "images": [data_uri(p) for p in photos]}
    body.update(changes)
    return body


@pytest.mark.parametrize("endpoint", ["fine_tune", "fine_tune_v2", "lora_fine_tune"])
def test_create_endpoints_answer_the_original_shape(stack: RunningStack, photos: list[Path], endpoint: str) -> None:
    body = example(endpoint, photos, base_model_id="tiny")
    if "max_train_steps" in body:
        body["max_train_steps"] = "20"
    if endpoint == "fine_tune_v2":
        body.update(steps_unet="20", steps_text_encoder="5")
    with stack.client() as client:
        response = client.post(f"/api/v3/{endpoint}", json=body)
        assert response.status_code == 201, response.text
        created = response.json()
        assert set(created) == CREATED_KEYS
        assert created["status"] == "success" and created["messege"] == "deploying_gpu"
        assert created["training_id"] == created["model_id"]
        assert created["data"].startswith("it will take upto ") and created["data"].endswith(".")
        status = client.post(f"/api/v3/fine_tune_status/{created['training_id']}", json={"key": KEYS[0]}).json()
        assert set(status) == STATUS_KEYS
        assert status["messege"] == status["training_status"]
        assert set(status["progress"]) == {"step", "total_steps", "percent"}
        cancelled = client.post(f"/api/v3/cancle_training/{created['training_id']}", json={"key": KEYS[0]})
    assert cancelled.status_code == 200 and cancelled.json()["messege"] == "training cancelled"


def test_form_encoded_create_with_string_numbers(stack: RunningStack, photos: list[Path]) -> None:
    form = {"key": KEYS[0], "instance_prompt": "photo of sks person", "base_model_id": "tiny",
            "images": [data_uri(photos[0])], "seed": "7", "max_train_steps": "5", "training_type": "null",
            "webhook": ""}
    with stack.client() as client:
        response = client.post("/api/v3/lora_fine_tune", data=form)
        assert response.status_code == 201, response.text
        training_id = response.json()["training_id"]
        client.post(f"/api/v3/cancel_training/{training_id}", json={"key": KEYS[0]})


def test_cancel_a_running_training_stops_the_worker_and_removes_its_files(stack: RunningStack, photos: list[Path]) -> None:
    with stack.client() as client:
        created = client.post("/api/v3/lora_fine_tune", json=example(
            "lora_fine_tune", photos, base_model_id="tiny", max_train_steps="3000")).json()
        training_id = created["training_id"]
        stack.wait_until_done(training_id, KEYS[0], until={"training_started"})
        assert stack.store.list(f"trainings/{training_id}/")  # inputs, crops, status exist now
        training_process = Path(f"/proc/{stack.flow_run(training_id)['infrastructure_pid']}")
        assert training_process.exists()
        started = time.monotonic()
        first = client.post(f"/api/v3/cancle_training/{training_id}", json={"key": KEYS[0]})
        status = client.post(f"/api/v3/fine_tune_status/{training_id}", json={"key": KEYS[0]}).json()
        while training_process.exists():
            assert time.monotonic() - started < 10, "the training process still runs 10 s after the cancel"
            time.sleep(0.1)
        seconds_to_stopped = time.monotonic() - started
        again = client.post(f"/api/v3/cancel_training/{training_id}", json={"key": KEYS[0]})
    assert first.status_code == 200 and again.status_code == 200
    assert status["training_status"] == "cancelled" and status["messege"] == "cancelled"
    while stack.flow_run(training_id)["state"]["type"] != "CANCELLED":
        assert time.monotonic() - started < 90, stack.flow_run(training_id)["state"]
        time.sleep(0.5)
    seconds_to_cancelled = time.monotonic() - started
    seconds_to_empty = wait_for_empty_prefix(stack, training_id) + seconds_to_cancelled
    print(f"\ncancel: training process gone {seconds_to_stopped:.1f} s after the call, Prefect state Cancelled"
          f" at {seconds_to_cancelled:.1f} s, prefix empty at {seconds_to_empty:.1f} s")


def wait_for_empty_prefix(stack: RunningStack, training_id: str, timeout_s: float = 90) -> float:
    started = time.monotonic()
    while stack.store.list(f"trainings/{training_id}/"):
        assert time.monotonic() - started < timeout_s, stack.store.list(f"trainings/{training_id}/")
        time.sleep(0.25)
    return time.monotonic() - started


def test_sandbox_base64_crop_link_and_delete(stack: RunningStack, photos: list[Path]) -> None:
    astronaut = photos[0].read_bytes()
    with stack.client() as client:
        cropped = client.post("/api/v3/base64_crop", json={"key": KEYS[0], "image": data_uri(photos[0])})
        raw = client.post("/api/v3/base64_crop", json={"key": KEYS[0], "image": base64.b64encode(astronaut).decode(),
                                                       "crop": "false"})
        assert cropped.status_code == 200, cropped.text
        upload = cropped.json()
        assert set(upload) == {"status", "messege", "link", "request_id"} and upload["messege"] == "image uploaded"
        assert isinstance(upload["request_id"], int)
        image = Image.open(io.BytesIO(client.get(upload["link"]).content))
        assert image.size == (512, 512)
        assert client.get(raw.json()["link"]).content == astronaut

        created = client.post("/api/sandbox/v3/fine_tune", json=example(
            "sandbox", photos, images=[upload["link"], data_uri(photos[1])])).json()
        training_id = created["training_id"]
        status, seen = stack.wait_until_done(training_id, KEYS[0])
        sandbox_status = client.post(f"/api/sandbox/v3/fine_tune_status/{training_id}", json={"key": KEYS[0]}).json()
        assert status["training_status"] == "model_ready", status
        assert sandbox_status["training_status"] == "model_ready"
        assert status["progress"]["total_steps"] == stack.settings.sandbox_steps
        assert client.post(f"/api/v3/cancel_training/{training_id}", json={"key": KEYS[0]}).status_code == 409

        link = status["links"]["lora_kohya"]
        assert client.get(link).status_code == 200
        deleted = client.post(f"/api/v3/finetune/delete/{training_id}", json={"key": KEYS[0]})
        assert deleted.status_code == 200 and deleted.json()["messege"] == "model deleted"
        # A finished training's files are gone when the call returns, however busy the workers are,
        # and so is every download link handed out for them.
        left = stack.store.list(f"trainings/{training_id}/")
        link_after = client.get(link)
        gone = client.post(f"/api/v3/fine_tune_status/{training_id}", json={"key": KEYS[0]})
        listed = client.post("/api/v3/finetune_list", json={"key": KEYS[0]}).json()["data"]
    assert left == [] and link_after.status_code == 404, (left, link_after.status_code)
    assert gone.status_code == 404 and gone.json()["messege"] == "Model id not found"
    assert training_id not in listed


@pytest.mark.parametrize(("image", "code"), [
    ("not base64 at all !!!", 400),
    (base64.b64encode(b"plain text, not an image").decode(), 400),
    (base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * (5 * 1024 * 1024 + 10)).decode(), 413),
    (base64.b64encode(small_jpeg(8)).decode(), 400),  # too small to train on (it crashed face detection once)
    (base64.b64encode(small_jpeg(63)).decode(), 400),
])
def test_base64_crop_refuses_bad_uploads(stack: RunningStack, image: str, code: int) -> None:
    with stack.client() as client:
        response = client.post("/api/v3/base64_crop", json={"key": KEYS[0], "image": image})
    assert response.status_code == code, response.text
    assert response.json()["status"] == "error"


def test_idempotency_key_returns_the_first_answer_and_starts_one_run(stack: RunningStack, photos: list[Path]) -> None:
    body = example("lora_fine_tune", photos[:1], base_model_id="tiny", max_train_steps="5")
    before = stack.flow_run_count()
    with stack.client() as client:
        responses = [
            client.post("/api/v3/lora_fine_tune", json=body, headers={"Idempotency-Key": "order-42"}),
            client.post("/api/v3/lora_fine_tune", json=body, headers={"Idempotency-Key": "order-42"}),
            client.post("/api/v3/lora_fine_tune", json={**body, "idempotency_key": "order-42"}),
            # a retry that changed its body still gets the first answer, time estimate included
            client.post("/api/v3/lora_fine_tune", json={**body, "max_train_steps": "4000"},
                        headers={"Idempotency-Key": "order-42"}),
        ]
        assert [r.status_code for r in responses] == [201] * 4, [r.text for r in responses]
        first, second, by_field, changed = (r.json() for r in responses)
        client.post(f"/api/v3/cancel_training/{first['training_id']}", json={"key": KEYS[0]})
    assert first == second == by_field == changed
    assert stack.flow_run_count() == before + 2  # the training and its cleanup after the cancel


def test_an_idempotency_key_of_a_deleted_training_is_refused_not_answered_with_its_id(
    stack: RunningStack, photos: list[Path]
) -> None:
    body = example("lora_fine_tune", photos[:1], base_model_id="tiny", max_train_steps="5")
    with stack.client() as client:
        first = client.post("/api/v3/lora_fine_tune", json=body, headers={"Idempotency-Key": "order-deleted"}).json()
        deleted = client.post(f"/api/v3/finetune/delete/{first['training_id']}", json={"key": KEYS[0]})
        assert deleted.status_code == 200, deleted.text
        before, stored = stack.flow_run_count(), set(stack.store.list("trainings/"))
        again = client.post("/api/v3/lora_fine_tune", json=body, headers={"Idempotency-Key": "order-deleted"})
        assert again.status_code == 409, again.text
        assert first["training_id"] in again.json()["messege"] and "new key" in again.json()["messege"]
        assert stack.flow_run_count() == before
        # its data: image was not left behind (other trainings' records may change meanwhile)
        assert not [key for key in set(stack.store.list("trainings/")) - stored if "/inputs/" in key]
        # another key starts a training as usual
        fresh = client.post("/api/v3/lora_fine_tune", json=body, headers={"Idempotency-Key": "order-new"})
        assert fresh.status_code == 201 and fresh.json()["training_id"] != first["training_id"]
        client.post(f"/api/v3/finetune/delete/{fresh.json()['training_id']}", json={"key": KEYS[0]})


def test_a_queued_training_counts_the_trainings_ahead_of_it(stack: RunningStack, photos: list[Path]) -> None:
    """Three trainings queued behind each other (the pool paused, so none starts): each later one is
    told of more trainings ahead and a longer wait, when created and while it waits."""
    body = example("lora_fine_tune", photos[:1], base_model_id="tiny", max_train_steps="300")
    with pool_paused(stack) as before, stack.client() as client:
        created = [client.post("/api/v3/lora_fine_tune", json=body).json() for _ in range(3)]
        minutes = [int(c["data"].split("upto ")[1].split(" minute")[0]) for c in created]
        assert minutes == sorted(minutes) and minutes[2] > minutes[0], created
        time.sleep(0.3)
        statuses = [client.post(f"/api/v3/fine_tune_status/{c['training_id']}", json={"key": KEYS[0]}).json()
                    for c in created]
    assert [s["messege"] for s in statuses] == ["deploying_gpu"] * 3, statuses
    etas = [s["eta_seconds"] for s in statuses]
    assert etas[0] < etas[1] < etas[2], statuses
    # each is one more behind; the first at least behind the trainings active before (the view, up to
    # 5 s old, may still count one that has just ended)
    ahead = [int(s["data"].split(" training")[0].rsplit("; ", 1)[1]) if " ahead in the queue" in s["data"] else 0
             for s in statuses]
    assert ahead[0] >= len(before) and ahead == [ahead[0], ahead[0] + 1, ahead[0] + 2], statuses
    assert f"{ahead[2]} trainings ahead in the queue, ETA : " in statuses[2]["data"], statuses


class Receiver(BaseHTTPRequestHandler):
    """A client's webhook endpoint: fails the very first delivery with a 500, then accepts."""

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers["content-length"]))
        server = self.server
        server.calls.append((dict(self.headers), body))  # type: ignore[attr-defined]
        self.send_response(500 if len(server.calls) == 1 else 200)  # type: ignore[attr-defined]
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    server.calls = []  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def expected_signature(headers: dict, body: bytes) -> str:
    secret = base64.b64decode(WEBHOOK_SECRET.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(secret, signed, hashlib.sha256).digest()).decode()


def test_webhooks_are_signed_retried_and_follow_the_status_order(
    stack: RunningStack, photos: list[Path], receiver: ThreadingHTTPServer
) -> None:
    url = f"http://127.0.0.1:{receiver.server_address[1]}/hook"
    with stack.client() as client:
        created = client.post("/api/sandbox/v3/fine_tune", json=example("sandbox", photos[:2], webhook=url)).json()
    stack.wait_until_done(created["training_id"], KEYS[0])
    calls = receiver.calls  # type: ignore[attr-defined]
    deadline = time.monotonic() + 30  # the status says model_ready once the manifest exists; its webhook follows
    while b'"model_ready"' not in calls[-1][1] and time.monotonic() < deadline:
        time.sleep(0.2)
    bodies = [json.loads(body) for _, body in calls]
    assert calls[0][0]["webhook-id"] == calls[1][0]["webhook-id"]  # the 500 was retried with the same id
    for headers, body in calls:
        assert headers["webhook-signature"] == expected_signature(headers, body)
    statuses = [b["training_status"] for b in bodies[1:]]
    assert statuses == sorted(set(statuses), key=ORDER.index), statuses
    assert statuses[0] == "deploying_gpu" and statuses[-1] == "model_ready"
    assert all(b["model_id"] == created["training_id"] and b["status"] == "success" for b in bodies)
    assert set(bodies[-1]) >= {"status", "training_status", "logs", "model_id"}


def test_deleting_a_running_training_tells_its_webhook_it_was_cancelled(
    stack: RunningStack, photos: list[Path], receiver: ThreadingHTTPServer
) -> None:
    url = f"http://127.0.0.1:{receiver.server_address[1]}/hook"
    body = example("lora_fine_tune", photos[:1], base_model_id="tiny", max_train_steps="3000", webhook=url)
    with stack.client() as client:
        training_id = client.post("/api/v3/lora_fine_tune", json=body).json()["training_id"]
        stack.wait_until_done(training_id, KEYS[0], until={"training_started"})
        assert client.post(f"/api/v3/finetune/delete/{training_id}", json={"key": KEYS[0]}).status_code == 200
    deadline = time.monotonic() + 90
    while not any(b'"cancelled"' in body for _, body in receiver.calls) and time.monotonic() < deadline:  # type: ignore[attr-defined]
        time.sleep(0.2)
    last = json.loads(receiver.calls[-1][1])  # type: ignore[attr-defined]
    assert last["training_status"] == "cancelled" and last["model_id"] == training_id, last
    assert "deleted" in last["logs"]


def test_webhook_to_a_private_address_is_refused_by_default() -> None:
    from flows.netguard import AddressRefused, check_public_url

    for url in ("http://127.0.0.1:9/hook", "http://10.0.0.1/hook", "http://169.254.169.254/latest", "http://localhost/x"):
        with pytest.raises(AddressRefused):
            check_public_url(url)


def test_an_undelivered_webhook_says_why() -> None:
    """The run log tells a refused address (no attempt made) from a receiver that never answered."""
    from s3server import free_ports
    from tasks.webhooks import DeliveryPolicy, deliver

    body = {"status": "success", "training_status": "training_started", "logs": "", "model_id": "x"}
    refused = deliver("http://127.0.0.1:9/hook", body, None, DeliveryPolicy())
    dead = deliver(f"http://127.0.0.1:{free_ports(1)[0]}/hook", body, None,
                   DeliveryPolicy(attempts=2, backoff_s=0.01, allow_private=True))
    assert refused is not None and refused.startswith("refused without an attempt: address 127.0.0.1")
    assert dead is not None and dead.startswith("2 attempts, the last failed: ")


def test_unknown_training_ids_are_404_for_every_endpoint(stack: RunningStack) -> None:
    with stack.client() as client:
        for path in ("fine_tune_status", "cancle_training", "cancel_training", "finetune/delete"):
            response = client.post(f"/api/v3/{path}/NoSuchId99", json={"key": KEYS[0]})
            assert response.status_code == 404 and response.json()["messege"] == "Model id not found"


def test_openapi_documents_every_endpoint_with_examples(stack: RunningStack) -> None:
    with stack.client() as client:
        spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    for path in ("/api/v3/fine_tune", "/api/v3/fine_tune_v2", "/api/v3/lora_fine_tune", "/api/v3/base64_crop",
                 "/api/sandbox/v3/fine_tune"):
        assert paths[path]["post"]["requestBody"]["content"]["application/json"]["example"], path
    for path in ("/api/v3/fine_tune_status/{training_id}", "/api/v3/cancle_training/{training_id}",
                 "/api/v3/cancel_training/{training_id}", "/api/v3/finetune_list",
                 "/api/v3/finetune/delete/{training_id}", "/api/sandbox/v3/fine_tune_status/{training_id}"):
        assert "post" in paths[path], path
