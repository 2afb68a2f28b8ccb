"""Faults injected for real on a stack of its own (Prefect server, worker, facade, SeaweedFS):
cancel at every stage, the S3 server stopped during the upload, the Prefect server restarted
mid-training. The session's shared stack is never touched.

Stages are reached with the test-only stage hold (``DREAMFLOW_TEST_STAGE_HOLD``): a training that
reports a stage waits there while a marker file exists. Figures go to bench/results/faults.json.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from faultfigures import record
from flows.records import read_manifest, read_stage, training_prefix
from s3server import WeedS3Server
from stackserver import KEYS, RunningStack, data_uri
from tasks.sample_photos import write_sample_photos

LOAD_BEFORE = [round(v, 2) for v in os.getloadavg()]
CANCEL_DEADLINE_S = 10.0
EMPTY_DEADLINE_S = 120.0
S3_OUTAGE_S = 15.0
PREFECT_OUTAGE_S = 10.0
QUICK_ANSWER_S = 5.0  # what "answers at once" means on a loaded 2-core machine


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WeedS3Server]:
    with WeedS3Server(tmp_path_factory.mktemp("fault-weed")) as server:
        yield server


@pytest.fixture(scope="module")
def faulty(s3: WeedS3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    """A stack of this module only; three runs per worker so a cleanup never waits for a training."""
    running = RunningStack.start(s3, tmp_path_factory.mktemp("fault-stack"), test_stage_hold=True, worker_runs=3)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_sample_photos(tmp_path_factory.mktemp("fault-injection-photos"), count=2)


def create_training(stack: RunningStack, photos: list[Path], steps: int = 5) -> str:
    with stack.client() as client:
        response = client.post("/api/v3/lora_fine_tune", json={
            "key": KEYS[0], "instance_prompt": "photo of sks person", "base_model_id": "tiny",
            "images": [data_uri(p) for p in photos], "max_train_steps": str(steps), "training_type": "women"})
    assert response.status_code == 201, response.text
    return response.json()["training_id"]


def run_state(stack: RunningStack, name: str) -> str:
    return stack.flow_run(name)["state"]["type"]


def state_history(stack: RunningStack, name: str) -> list[str]:
    """The state types a flow run went through, oldest first."""
    run_id = stack.flow_run(name)["id"]
    response = httpx.get(f"{stack.settings.prefect_api}/flow_run_states/", params={"flow_run_id": run_id}, timeout=10)
    response.raise_for_status()
    return [state["type"] for state in sorted(response.json(), key=lambda s: s["timestamp"])]


def wait_for_stage(stack: RunningStack, training_id: str, stage: str, timeout_s: float = 300) -> None:
    """Until the pipeline's own record says it is at ``stage``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        current = read_stage(stack.store, training_id)
        if current is not None and current.stage == stage:
            return
        assert run_state(stack, training_id) in ("SCHEDULED", "PENDING", "RUNNING"), stack.flow_run(training_id)
        time.sleep(0.2)
    raise AssertionError(f"{training_id} never reached {stage}; logs in {stack.stack.log_dir}")


def wait_for(check: object, timeout_s: float, what: str) -> float:
    """Poll ``check()`` until true; returns the seconds it took."""
    started = time.monotonic()
    while not check():  # type: ignore[operator]
        assert time.monotonic() - started < timeout_s, f"{what} not within {timeout_s:.0f} s"
        time.sleep(0.2)
    return time.monotonic() - started


def gpu_slots_in_use(stack: RunningStack) -> int:
    response = httpx.get(f"{stack.settings.prefect_api}/v2/concurrency_limits/dreamflow-gpu", timeout=10)
    response.raise_for_status()
    return int(response.json()["active_slots"])


def cancel_and_measure(stack: RunningStack, training_id: str) -> dict[str, float]:
    """Cancel through the facade; the status must say cancelled within 10 s and the prefix empty."""
    prefix = training_prefix(training_id)
    assert stack.store.list(prefix), "nothing stored before the cancel"
    started = time.monotonic()
    with stack.client() as client:
        response = client.post(f"/api/v3/cancle_training/{training_id}", json={"key": KEYS[0]})
        call_s = time.monotonic() - started
        assert response.status_code == 200, response.text

        def says_cancelled() -> bool:
            return client.post(f"/api/v3/fine_tune_status/{training_id}",
                               json={"key": KEYS[0]}).json()["training_status"] == "cancelled"

        wait_for(says_cancelled, CANCEL_DEADLINE_S, "status cancelled")
        to_cancelled = time.monotonic() - started
        wait_for(lambda: not stack.store.list(prefix), EMPTY_DEADLINE_S, f"empty {prefix}")
        to_empty = time.monotonic() - started
        wait_for(lambda: run_state(stack, training_id) == "CANCELLED", 60, "Prefect state Cancelled")
        to_run_cancelled = time.monotonic() - started
        time.sleep(3)  # nothing comes back: no late write, no rerun
        assert not stack.store.list(prefix), stack.store.list(prefix)
        assert run_state(stack, training_id) == "CANCELLED"
        assert says_cancelled()
    workdir = stack.settings.resolved_data_dir / "work" / training_id
    return {"cancel_call_s": call_s, "to_status_cancelled_s": to_cancelled, "to_prefix_empty_s": to_empty,
            "to_prefect_cancelled_s": to_run_cancelled, "workdir_left": workdir.exists()}


def test_cancel_a_queued_training_removes_its_inputs_at_once(faulty: RunningStack, photos: list[Path]) -> None:
    """The pool is paused (every worker busy, say): the run stays Scheduled and the cancel needs no worker."""
    faulty.set_pool_paused(True)
    try:
        training_id = create_training(faulty, photos)
        time.sleep(2)
        assert run_state(faulty, training_id) == "SCHEDULED"
        figures = cancel_and_measure(faulty, training_id)
    finally:
        faulty.set_pool_paused(False)
    cleanup = f"cleanup-{training_id}"
    wait_for(lambda: run_state(faulty, cleanup) == "COMPLETED", 120, "the cleanup run")
    assert state_history(faulty, training_id) == ["SCHEDULED", "CANCELLED"]  # it never ran
    assert not faulty.store.list(training_prefix(training_id))
    record("cancel", "queued", {**figures, "tries": 1, "outcome": "cancelled, inputs removed by the facade"},
           LOAD_BEFORE)


@pytest.mark.parametrize("stage", ["fetching", "cropping", "converting", "uploading", "training"])
def test_cancel_at_every_stage_leaves_nothing_stored(faulty: RunningStack, photos: list[Path], stage: str) -> None:
    faulty.hold(stage)
    try:
        training_id = create_training(faulty, photos)
        wait_for_stage(faulty, training_id, stage)
        figures = cancel_and_measure(faulty, training_id)
    finally:
        faulty.release(stage)
    slots_free_s = wait_for(lambda: gpu_slots_in_use(faulty) == 0, 90, "the GPU slot freed")
    assert not figures["workdir_left"], "the cleanup left the local work folder"
    record("cancel", stage, {**figures, "gpu_slot_free_after_s": slots_free_s, "tries": 1,
                             "outcome": "cancelled, prefix empty"}, LOAD_BEFORE)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_model_complete(stack: RunningStack, training_id: str) -> int:
    """Every file the manifest lists is stored with its size and sha256; returns how many."""
    manifest = read_manifest(stack.store, training_id)
    assert manifest is not None
    files = [*manifest.files.values(), *manifest.samples]
    for stored in files:
        data = stack.store.get_bytes(stored.key)
        assert (len(data), sha256_hex(data)) == (stored.size, stored.sha256), stored.key
    return len(files)


def test_a_crash_after_the_manifest_keeps_the_published_model_as_it_is(faulty: RunningStack, photos: list[Path]) -> None:
    """The process dies after writing manifest.json (held at the "ready" report, then killed): the
    status stays model_ready throughout, and the rerun neither trains again nor replaces a file that
    links already point at; it only finishes what follows the manifest."""
    import signal

    faulty.hold("ready")
    try:
        training_id = create_training(faulty, photos, steps=8)
        wait_for_stage(faulty, training_id, "ready")
        published = read_manifest(faulty.store, training_id)
        assert published is not None
        os.kill(int(faulty.flow_run(training_id)["infrastructure_pid"]), signal.SIGKILL)
    finally:
        faulty.release("ready")
    seen = set()

    def rerun_finished() -> bool:
        seen.add(faulty.status(training_id).json()["training_status"])
        run = faulty.flow_run(training_id)
        return run["run_count"] >= 2 and run["state"]["type"] == "COMPLETED"

    wait_for(rerun_finished, 240, "the rerun after the crash")
    assert seen == {"model_ready"}, seen
    assert read_manifest(faulty.store, training_id) == published  # the same files, sha256 and all
    assert_model_complete(faulty, training_id)
    assert not faulty.store.list(f"{training_prefix(training_id)}checkpoints/")


def test_s3_stopped_during_the_upload_is_retried_and_the_model_is_complete(
    faulty: RunningStack, s3: WeedS3Server, photos: list[Path]
) -> None:
    faulty.hold("uploading")
    try:
        training_id = create_training(faulty, photos)
        wait_for_stage(faulty, training_id, "uploading")
        stop_began = time.monotonic()
        s3.stop()
    finally:
        faulty.release("uploading")  # the upload now runs against a dead S3 server
    answers: dict[str, int] = {}
    slowest = 0.0
    with faulty.client() as client:
        while time.monotonic() - stop_began < S3_OUTAGE_S:
            asked = time.monotonic()
            response = client.post(f"/api/v3/fine_tune_status/{training_id}", json={"key": KEYS[0]})
            listed = client.post("/api/v3/finetune_list", json={"key": KEYS[0]})
            slowest = max(slowest, time.monotonic() - asked)
            assert response.status_code in (200, 503) and listed.status_code == 200, response.text
            body = response.json()
            assert response.status_code == 200 or body["status"] == "error"
            assert body.get("training_status") != "model_ready"
            answers[str(response.status_code)] = answers.get(str(response.status_code), 0) + 1
            time.sleep(0.5)
    s3.start()
    back = time.monotonic()
    outage = back - stop_began
    seen: list[str] = []
    with faulty.client() as client:
        while True:
            assert time.monotonic() - back < 300, f"not ready 300 s after S3 came back; seen {seen}"
            body = client.post(f"/api/v3/fine_tune_status/{training_id}", json={"key": KEYS[0]}).json()
            if not seen or seen[-1] != body["training_status"]:
                seen.append(body["training_status"])
            if body["training_status"] == "model_ready":
                files = assert_model_complete(faulty, training_id)  # checked when first seen ready
                break
            assert body["training_status"] not in ("failed", "cancelled"), body
            time.sleep(0.3)
    to_ready = time.monotonic() - back
    attempts = upload_attempts(faulty, training_id)
    assert attempts >= 2, "the upload did not meet the outage"
    record("s3_outage", "stopped_during_upload", {
        "tries": 1, "outcome": "model_ready, every file's sha256 matches the manifest",
        "outage_s": outage, "s3_restart_s": s3.startup_s, "s3_back_to_model_ready_s": to_ready,
        "upload_task_attempts": attempts, "status_answers_during_outage": answers,
        "slowest_status_answer_during_outage_s": slowest, "statuses_after": seen, "files_verified": files,
    }, LOAD_BEFORE)


def upload_attempts(stack: RunningStack, training_id: str) -> int:
    """How often the model upload task ran (1 + its retries)."""
    run_id = stack.flow_run(training_id)["id"]
    response = httpx.post(f"{stack.settings.prefect_api}/task_runs/filter", timeout=10, json={
        "flow_runs": {"id": {"any_": [run_id]}}, "task_runs": {"name": {"like_": "upload-artifacts"}}})
    response.raise_for_status()
    return max(run["run_count"] for run in response.json())


def test_prefect_restarted_mid_training_answers_503_then_the_run_finishes(
    faulty: RunningStack, photos: list[Path]
) -> None:
    training_id = create_training(faulty, photos, steps=40)
    deadline = time.monotonic() + 300
    while (faulty.status(training_id).json()["progress"]["step"] or 0) < 5:
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.3)
    stop_began = time.monotonic()
    faulty.stop_prefect_server()
    stopped_s = time.monotonic() - stop_began
    slowest: dict[str, float] = {}
    answers = 0
    with faulty.client() as client:
        while time.monotonic() - stop_began < stopped_s + PREFECT_OUTAGE_S:
            for path, body in ((f"/api/v3/fine_tune_status/{training_id}", {"key": KEYS[0]}),
                               ("/api/v3/finetune_list", {"key": KEYS[0]}),
                               ("/api/v3/lora_fine_tune", {"key": KEYS[0], "instance_prompt": "photo of sks person",
                                                           "base_model_id": "tiny", "images": [data_uri(photos[0])]})):
                asked = time.monotonic()
                response = client.post(path, json=body)
                route = path.split("/")[3]
                slowest[route] = max(slowest.get(route, 0.0), time.monotonic() - asked)
                assert response.status_code == 503, (path, response.status_code, response.text)
                error = response.json()
                assert error["status"] == "error" and "orchestrator (Prefect)" in error["messege"], error
                assert error["message"] == error["messege"]
                answers += 1
            time.sleep(0.3)
    assert max(slowest.values()) < QUICK_ANSWER_S, f"slow answers while Prefect was down: {slowest}"
    restart_began = time.monotonic()
    faulty.start_prefect_server()
    restart_s = time.monotonic() - restart_began
    outage = time.monotonic() - stop_began
    status, seen = faulty.wait_until_done(training_id, KEYS[0], timeout_s=400)
    to_ready = time.monotonic() - stop_began - outage
    assert status["training_status"] == "model_ready", (status, seen)
    wait_for(lambda: run_state(faulty, training_id) != "RUNNING", 60, "the run's final state")
    run = faulty.flow_run(training_id)
    assert run["state"]["type"] == "COMPLETED" and run["run_count"] == 1, run  # not crashed and rerun
    slot_free_s = wait_for(lambda: gpu_slots_in_use(faulty) == 0, 90, "the GPU slot freed after the restart")
    assert all(proc.poll() is None for _, proc in faulty.stack.processes), "a stack process died"
    record("prefect_restart", "mid_training", {
        "tries": 1, "outcome": "503 in the API error shape while down; run finished model_ready, not rerun",
        "outage_s": outage, "server_stop_s": stopped_s, "server_start_s": restart_s,
        "answers_during_outage": answers,
        "slowest_answer_during_outage_s": {route: round(t, 2) for route, t in slowest.items()},
        "back_to_model_ready_s": to_ready, "gpu_slot_free_after_ready_s": slot_free_s, "files_verified": assert_model_complete(faulty, training_id),
    }, LOAD_BEFORE)


def test_a_training_cut_off_by_a_whole_stack_stop_resumes_after_dreamflow_up(
    faulty: RunningStack, photos: list[Path]
) -> None:
    """Every process stops together (Ctrl+C of dreamflow up, or the machine goes down): nobody records
    the run's end, and Prefect keeps it Running. The next dreamflow up marks it Crashed and hands it
    to crash recovery, which reruns it from its last checkpoint. (Last in this module: it restarts
    the module's stack.)"""
    from deployments.stack import start_stack

    every = faulty.settings.checkpoint_every
    training_id = create_training(faulty, photos, steps=12 * every)
    wait_for(lambda: faulty.status(training_id).json()["progress"]["step"] > every + 2, 300, "a stored checkpoint")
    faulty.stack.stop()
    faulty.stack = start_stack(faulty.settings)
    assert f"{training_id}: crashed, recovery started" in faulty.stack.recovered, faulty.stack.recovered
    status, seen = faulty.wait_until_done(training_id, KEYS[0], timeout_s=400)
    assert status["training_status"] == "model_ready", (status, seen)
    manifest = read_manifest(faulty.store, training_id)
    assert manifest is not None and manifest.resumed_from is not None and manifest.resumed_from >= every, manifest
    assert manifest.steps == 12 * every and faulty.flow_run(training_id)["run_count"] == 2
    assert_model_complete(faulty, training_id)
