"""Faults injected for real on the running stack: a training process killed mid-training, one that
dies before its flow begins, a webhook receiver that is down."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import uuid
from pathlib import Path

import pytest
from gatedreceiver import gated_receiver
from prefectruns import read_flow_run, start_deployment_run, state_history
from stackserver import KEYS, RunningStack, data_uri

from flows.params import TrainingParams
from flows.settings import hash_key
from tasks.sample_photos import write_sample_photos


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_sample_photos(tmp_path_factory.mktemp("fault-photos"), count=2)


def wait_for_step(stack: RunningStack, training_id: str, step: int, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    with stack.client() as client:
        while time.monotonic() < deadline:
            status = client.post(f"/api/v3/fine_tune_status/{training_id}", json={"key": KEYS[0]}).json()
            assert status["training_status"] not in ("failed", "model_ready"), status
            if status["progress"]["step"] >= step:
                return
            time.sleep(0.2)
    raise AssertionError(f"{training_id} did not reach step {step}")


def test_a_killed_training_process_is_rerun_and_resumes_from_its_checkpoint(
    stack: RunningStack, photos: list[Path]
) -> None:
    every = stack.settings.checkpoint_every
    with stack.client() as client:
        created = client.post("/api/v3/lora_fine_tune", json={
            "key": KEYS[0], "instance_prompt": "photo of sks person", "base_model_id": "tiny",
            "images": [data_uri(p) for p in photos], "max_train_steps": str(4 * every), "training_type": "women",
        }).json()
    training_id = created["training_id"]
    wait_for_step(stack, training_id, 2 * every + 5)  # at least one checkpoint is stored
    os.kill(int(stack.flow_run(training_id)["infrastructure_pid"]), signal.SIGKILL)  # the worker's child dies

    status, _ = stack.wait_until_done(training_id, KEYS[0], timeout_s=400)
    assert status["training_status"] == "model_ready", status
    manifest = json.loads(stack.store.get_bytes(f"trainings/{training_id}/manifest.json"))
    assert manifest["resumed_from"] is not None and manifest["resumed_from"] >= every, manifest
    assert manifest["steps"] == 4 * every
    assert stack.flow_run(training_id)["run_count"] >= 2
    assert not stack.store.list(f"trainings/{training_id}/checkpoints/")  # gone once the model is complete


def test_a_training_whose_process_dies_before_its_flow_begins_fails_after_three_crashes(stack: RunningStack) -> None:
    """Every run of it exits at once (think of a broken install): crash recovery queues it again
    twice and then fails it, instead of rerunning it every second for ever."""
    params = TrainingParams(training_id=f"crash{uuid.uuid4().hex[:10]}", owner=hash_key(KEYS[0]),
                            instance_prompt="photo of sks thing", images=["store:uploads/none.png"])
    run_id = start_deployment_run(
        stack.settings.prefect_api, "dreamflow-training/sandbox", {"params": params.model_dump(mode="json")},
        tags=[f"training:{params.training_id}", f"owner:{params.owner}"],  # as the facade tags its runs
        job_variables={"command": f"{sys.executable} -c 'raise SystemExit(3)'"},  # dies before the flow
    )
    deadline = time.monotonic() + 120
    while (run := read_flow_run(stack.settings.prefect_api, run_id)).state.type.value != "FAILED":
        assert time.monotonic() < deadline, f"not failed after 120 s: {state_history(stack.settings.prefect_api, run_id)}"
        time.sleep(0.5)
    assert "crashed 3 times" in run.state.message, f"{run.state.message}: {state_history(stack.settings.prefect_api, run_id)}"
    with stack.client() as client:
        status = client.post(f"/api/v3/fine_tune_status/{params.training_id}", json={"key": KEYS[0]}).json()
    assert status["training_status"] == "failed" and "crashed 3 times" in status["error"], status
    time.sleep(3)  # no rerun after the failure
    history = state_history(stack.settings.prefect_api, run_id)
    assert history.count("Pending") == 3 and history[-1] == "Failed", history  # three attempts, then no more
    assert history.count("Crashed") >= 3, history  # the worker may report one crash twice


def test_crash_recovery_counts_attempts_not_crash_reports() -> None:
    from prefect.client.schemas.objects import StateType as S

    from flows.recover import attempts

    # the worker took the run twice; the first crash was reported twice (runner, then worker)
    history = [S.SCHEDULED, S.PENDING, S.PENDING, S.CRASHED, S.SCHEDULED, S.CRASHED, S.SCHEDULED,
               S.PENDING, S.PENDING, S.RUNNING, S.CRASHED]
    assert attempts(history) == 2
    assert attempts([S.SCHEDULED]) == 0


def test_a_webhook_receiver_that_is_down_does_not_affect_the_training(stack: RunningStack, photos: list[Path]) -> None:
    from s3server import free_ports

    dead = f"http://127.0.0.1:{free_ports(1)[0]}/hook"  # nothing listens there
    with stack.client() as client:
        created = client.post("/api/sandbox/v3/fine_tune", json={
            "key": KEYS[0], "instance_prompt": "photo of sks person", "images": [data_uri(photos[0])],
            "webhook": dead}).json()
    status, _ = stack.wait_until_done(created["training_id"], KEYS[0])
    assert status["training_status"] == "model_ready", status


def test_a_receiver_that_hangs_holds_up_neither_the_training_nor_its_later_deliveries(
    stack: RunningStack, photos: list[Path]
) -> None:
    """Each delivery to it times out (5 s) and is retried three times: about 24 s per status change.
    Delivered inline, the pipeline waited for each of its eight; delivered beside it, the model is
    ready while the receiver still holds the first ones, and the rest follow in order once it answers."""
    with gated_receiver() as receiver:
        with stack.client() as client:
            created = client.post("/api/sandbox/v3/fine_tune", json={
                "key": KEYS[0], "instance_prompt": "photo of sks person", "images": [data_uri(photos[0])],
                "webhook": receiver.url}).json()
        status, seen = stack.wait_until_done(created["training_id"], KEYS[0])
        assert status["training_status"] == "model_ready", status
        reached = list(dict.fromkeys(receiver.arrived))
        # inline, deploying_model (the status before model_ready) had to be tried before the model was published
        assert "deploying_model" not in reached and "model_ready" not in reached, (reached, seen)
        receiver.gate.set()
        deadline = time.monotonic() + 60
        while "model_ready" not in receiver.arrived and time.monotonic() < deadline:
            time.sleep(0.2)
        delivered = list(dict.fromkeys(receiver.arrived))
        assert delivered[0] == "deploying_gpu" and delivered[-1] == "model_ready", delivered
        assert set(seen) <= set(delivered), (seen, delivered)  # every status a poller saw was delivered too


def wait_for_worker(stack: RunningStack, name: str, timeout_s: float = 90) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    url = f"{stack.settings.prefect_api}/work_pools/{stack.settings.work_pool}/workers/filter"
    while time.monotonic() < deadline:
        workers = {w["name"]: w["status"] for w in httpx.post(url, json={}, timeout=10).json()}
        if workers.get(name) == "ONLINE":
            return
        time.sleep(0.5)
    raise AssertionError(f"{name} did not come online")


def test_two_workers_share_one_gpu_slot_and_finish_every_training(stack: RunningStack, photos: list[Path]) -> None:
    """A second worker joins the pool; four queued trainings at DREAMFLOW_GPU_SLOTS=1: both workers
    take work, no two trainings hold the GPU at once, all four finish."""
    import httpx

    from deployments.stack import worker_command

    assert stack.settings.gpu_slots == 1
    stack.stack.spawn("worker-1", worker_command(stack.settings, 1))
    try:
        wait_for_worker(stack, "dreamflow-worker-1")
        with stack.client() as client:
            ids = [client.post("/api/sandbox/v3/fine_tune", json={
                "key": KEYS[1], "instance_prompt": "photo of sks person", "images": [data_uri(photos[i % 2])],
            }).json()["training_id"] for i in range(4)]
        busiest = 0
        deadline = time.monotonic() + 600
        while True:
            limit = httpx.get(f"{stack.settings.prefect_api}/v2/concurrency_limits/dreamflow-gpu", timeout=10).json()
            busiest = max(busiest, limit["active_slots"])
            states = [stack.flow_run(i)["state"]["type"] for i in ids]
            if all(s in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for s in states) or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert states == ["COMPLETED"] * 4, states
        assert busiest == 1
        spans = sorted(tuple(json.loads(stack.store.get_bytes(f"trainings/{i}/manifest.json"))["trained_between"])
                       for i in ids)
        assert all(earlier[1] <= later[0] for earlier, later in zip(spans, spans[1:])), spans
        run_ids = [stack.flow_run(i)["id"] for i in ids]
        for name in ("worker-0", "worker-1"):
            log = (stack.stack.log_dir / f"{name}.log").read_text()
            assert any(f"submitting flow run '{run_id}'" in log for run_id in run_ids), f"{name} took none of them"
    finally:
        stack.stack.retire("worker-1")  # stopped for good: the stack's supervision would start it again
