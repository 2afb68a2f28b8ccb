"""Benchmark: a whole 10-photo sandbox job through the stack, cold then warm: stages, overhead, memory.

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_pipeline.py [--steps 30]``.
Writes ``bench/results/pipeline.json`` and prints it.

It starts the stack (Prefect server, one process worker, facade; local storage, free ports, a
temporary data folder) and sends the same sandbox job twice: 10 face photos (those of
bench_face_crop.py, as 512 px JPEG data URIs), `tiny`, ``--steps`` LoRA steps, on two stacks in
turn: one with ``DREAMFLOW_WARM_RUNNER=false`` (every flow run a fresh Python process that imports
torch, diffusers and Prefect: "cold process") and one with the warm runner (every flow run forked
from a process that already imported them). On each, the first job is that of a fresh stack (the
tiny model not yet built) and the second the same job again. For each job it reads from the Prefect REST API the flow run, its
state history and every task run's start and end, and from the job's status record the training
loop's measured rate. While the job runs it polls ``/proc/<infrastructure_pid>/status`` every
0.2 s for VmHWM (peak RSS) of the flow-run process (with the warm runner, the runner's fork).

Reported per job: per-stage (task run) wall time; the flow-run process start-up, split into
queue wait (created -> Pending: worker poll), process start (Pending -> Running) and flow start
(Running -> first task start); the finish (last task end -> flow run end); the training loop
time (steps / measured steps/s); whole job = flow run created -> flow run end; overhead = whole
job - training loop; the same to the model being ready (the manifest task's end), which leaves
out Prefect's own end of the run; what the client saw (POST -> model_ready in a 0.2 s status
poll); the flow run's log lines with their times (where each stage's seconds went); and the
samples' denoising seconds (from make-samples' log line) with the overhead less them.
``--warm-only`` skips the cold-process stack and ``--repeat N`` sends N jobs after the first.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchresults import load_average, write_result
from benchstack import (
    KEY,
    TERMINAL,
    base_url,
    create_sandbox,
    flow_run,
    jpeg_data_uri,
    start_bench_stack,
)

from flows.settings import Settings

PHOTO_SIDE = 512
POLL_S = 0.2
TARGET_OVERHEAD_S = 3.0


def build_job_photos(folder: Path) -> list[str]:
    """The 10 face photos of the face-crop benchmark, as 512 px JPEG data URIs."""
    from bench_face_crop import build_photos

    return [jpeg_data_uri(path, PHOTO_SIDE) for path in build_photos(folder)]


def read_vm(pid: int) -> dict[str, int] | None:
    """VmHWM and VmRSS (kB) of a live process, or None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    values = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmHWM", "VmRSS"):
            values[name] = int(rest.split()[0])
    return values


def runner_child(runner_pid: int) -> int | None:
    """The warm runner's forked flow-run process (jobs run one at a time here), if any."""
    try:
        children = Path(f"/proc/{runner_pid}/task/{runner_pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[-1]) if children else None


def follow_job(settings: Settings, client: httpx.Client, training_id: str, posted: float,
               timeout_s: float, runner_pid: int | None) -> dict[str, Any]:
    """Poll every 0.2 s until the job ends: the process's peak RSS and when the client saw it ready.

    The flow-run process is the worker's child (``infrastructure_pid``), or with the warm runner
    the runner's fork that the launcher (the worker's child) asked for.
    """
    pid, peak_kb, samples, ready_at, final = None, 0, 0, None, None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pid is None and runner_pid is not None:
            pid = runner_child(runner_pid)
        elif pid is None:
            raw = flow_run(settings, training_id).get("infrastructure_pid")
            pid = int(str(raw).rsplit(":", 1)[-1]) if raw else None
        vm = read_vm(pid) if pid is not None else None
        if vm is not None:
            peak_kb, samples = max(peak_kb, vm.get("VmHWM", 0)), samples + 1
        if ready_at is None:
            body = client.post(f"/api/v3/fine_tune_status/{training_id}", json={"key": KEY}).json()
            if body.get("training_status") in TERMINAL:
                ready_at, final = time.time(), body
        if ready_at is not None and (pid is None or vm is None):
            break
        time.sleep(POLL_S)
    else:
        raise TimeoutError(f"job {training_id} did not end within {timeout_s:.0f} s")
    return {"infrastructure_pid": pid, "peak_rss_mb": peak_kb / 1024, "rss_samples": samples,
            "client_post_to_ready_s": (ready_at - posted) if ready_at else None,
            "final_status": final.get("training_status") if final else None,
            "error": final.get("error") if final else None, "ready_at": ready_at}


def ts(value: str | None) -> float | None:
    return datetime.fromisoformat(value).timestamp() if value else None


def prefect_records(settings: Settings, run: dict) -> tuple[list[dict], list[dict]]:
    """(state history, task runs) of a flow run, both oldest first."""
    api = settings.prefect_api
    states = httpx.get(f"{api}/flow_run_states/", params={"flow_run_id": run["id"]}, timeout=10).json()
    tasks = httpx.post(f"{api}/task_runs/filter", timeout=10, json={
        "flow_runs": {"id": {"any_": [run["id"]]}}, "sort": "EXPECTED_START_TIME_ASC", "limit": 200,
    }).json()
    states.sort(key=lambda s: ts(s["timestamp"]))
    tasks.sort(key=lambda t: ts(t["start_time"]) or 0.0)
    return states, tasks


def log_timeline(settings: Settings, run: dict, created: float) -> list[tuple[float, str]]:
    """The flow run's log lines in Prefect, each with its time after the flow run was created."""
    logs = httpx.post(f"{settings.prefect_api}/logs/filter", timeout=10, json={
        "logs": {"flow_run_id": {"any_": [run["id"]]}}, "sort": "TIMESTAMP_ASC", "limit": 200,
    }).json()
    return [(round(ts(line["timestamp"]) - created, 3), line["message"][:160]) for line in logs]


def sample_render_s(timeline: list[tuple[float, str]]) -> float | None:
    """The denoising seconds of the samples, from make-samples' log line ("rendered in X s")."""
    for _, message in timeline:
        found = re.search(r"rendered in ([0-9.]+) s", message)
        if found:
            return float(found.group(1))
    return None


def first_state(states: list[dict], kind: str) -> float | None:
    return next((ts(s["timestamp"]) for s in states if s["type"] == kind), None)


def job_timeline(settings: Settings, training_id: str, followed: dict[str, Any]) -> dict[str, Any]:
    """Per-stage times, start-up split, training loop and overhead of one finished job."""
    from flows.records import read_stage
    from flows.store import store_from_settings

    run = flow_run(settings, training_id)
    states, tasks = prefect_records(settings, run)
    created, end = ts(run["created"]), ts(run["end_time"])
    pending, running = first_state(states, "PENDING"), first_state(states, "RUNNING")
    first_task, last_task = ts(tasks[0]["start_time"]), max(ts(t["end_time"]) for t in tasks)
    stage = read_stage(store_from_settings(settings), training_id)
    loop_s = stage.total_steps / stage.steps_per_s if stage and stage.steps_per_s else None
    whole = end - created
    manifest = next((t for t in tasks if t["name"].startswith("publish-manifest")), None)
    ready = ts(manifest["end_time"]) - created if manifest and manifest.get("end_time") else None
    timeline = log_timeline(settings, run, created)
    render_s = sample_render_s(timeline)
    overhead = whole - loop_s if loop_s else None
    return {
        "training_id": training_id, "flow_run_state": run["state_type"], **followed,
        "stages": [{"task": t["name"], "wall_s": ts(t["end_time"]) - ts(t["start_time"]),
                    "starts_after_flow_created_s": ts(t["start_time"]) - created, "state": t["state_type"]}
                   for t in tasks],
        "startup": {"queue_wait_created_to_pending_s": pending - created,
                    "process_start_pending_to_running_s": running - pending,
                    "flow_start_running_to_first_task_s": first_task - running,
                    "created_to_first_task_s": first_task - created},
        "tasks_span_s": last_task - first_task,
        "sum_of_task_wall_s": sum(ts(t["end_time"]) - ts(t["start_time"]) for t in tasks),
        "finish_last_task_end_to_flow_end_s": end - last_task,
        "flow_end_to_client_saw_ready_s": followed["ready_at"] - end if followed["ready_at"] else None,
        "training_loop_s": loop_s, "training_steps": stage.total_steps if stage else None,
        "training_steps_per_s": stage.steps_per_s if stage else None,
        "whole_job_created_to_end_s": whole,
        "overhead_s": overhead,
        # The samples' denoising is model compute like the loop (2 images x 20 steps with CFG of
        # the tiny UNet on this CPU; a GPU renders them in a fraction): the overhead without it.
        "sample_render_s": render_s,
        "overhead_without_sample_render_s": overhead - render_s if overhead is not None and render_s else None,
        # The manifest makes the model ready for the client; after it, only Prefect's bookkeeping
        # (the flow's heartbeat-thread join, its final state), which delays no user and no other job.
        "created_to_model_ready_s": ready,
        "overhead_to_model_ready_s": ready - loop_s if ready is not None and loop_s else None,
        "stage_log": stage.log if stage else [],
        "log_timeline": timeline,
    }


def run_job(settings: Settings, client: httpx.Client, images: list[str], timeout_s: float,
            runner_pid: int | None) -> dict[str, Any]:
    posted = time.time()
    training_id = create_sandbox(client, images)
    followed = follow_job(settings, client, training_id, posted, timeout_s, runner_pid)
    time.sleep(1.0)  # let the worker record the final states
    timeline = job_timeline(settings, training_id, followed)
    timeline.pop("ready_at", None)
    return timeline


def run_stack_jobs(work: Path, images: list[str], args: argparse.Namespace, warm_runner: bool) -> dict[str, Any]:
    """A fresh stack (with or without the warm runner) and the same job twice on it."""
    settings, stack = start_bench_stack(work / ("data-warm" if warm_runner else "data-cold"),
                                        sandbox_steps=args.steps, warm_runner=warm_runner)
    runner = next((proc for name, proc in stack.processes if name == "warm-runner"), None)
    jobs: dict[str, Any] = {}
    try:
        if runner is not None:
            wait_for_runner(stack, args.timeout)
        with httpx.Client(base_url=base_url(settings), timeout=60) as client:
            for name in ["first", "again"] + [f"again_{n}" for n in range(2, args.repeat + 1)]:
                jobs[name] = run_job(settings, client, images, args.timeout, runner.pid if runner else None)
        if runner is not None:
            vm = read_vm(runner.pid) or {}
            jobs["warm_runner_rss_mb"] = vm.get("VmRSS", 0) / 1024
    finally:
        stack.stop()
    return jobs


def wait_for_runner(stack: Any, timeout_s: float) -> None:
    """Until the warm runner has done its imports (its log says ready)."""
    log = stack.log_dir / "warm-runner.log"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if log.exists() and "warm runner ready" in log.read_text(errors="replace"):
            return
        time.sleep(0.5)
    raise TimeoutError("the warm runner did not get ready")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps of each job (sandbox_steps)")
    parser.add_argument("--repeat", type=int, default=1, help="jobs after the first on each stack")
    parser.add_argument("--warm-only", action="store_true", help="skip the cold-process stack (a quicker look)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds one job may take")
    args = parser.parse_args(argv)

    load_before = load_average()
    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    try:
        images = build_job_photos(work / "photos")
        cold = {} if args.warm_only else run_stack_jobs(work, images, args, warm_runner=False)
        warm = run_stack_jobs(work, images, args, warm_runner=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    jobs = {f"cold_process_{name}".replace("_first", ""): job for name, job in cold.items() if name.startswith(("first", "again"))}
    jobs |= {f"warm_runner_{name}": job for name, job in warm.items() if name.startswith(("first", "again"))}
    warm_again = [job for name, job in jobs.items() if name.startswith("warm_runner_again")]
    warm_overheads = [job["overhead_s"] for job in warm_again if job["overhead_s"] is not None]
    ready_overheads = [job["overhead_to_model_ready_s"] for job in warm_again if job["overhead_to_model_ready_s"]]
    unrendered = [job["overhead_without_sample_render_s"] for job in warm_again
                  if job["overhead_without_sample_render_s"] is not None]
    body = {
        "setup": {"photos": len(images), "photo_side": PHOTO_SIDE, "format": "JPEG data URIs",
                  "endpoint": "/api/sandbox/v3/fine_tune", "base_model": "tiny", "method": "lora",
                  "steps": args.steps, "storage": "local", "workers": 1, "rss_poll_s": POLL_S,
                  "device": "cpu",
                  "cold_process": "DREAMFLOW_WARM_RUNNER=false: each flow run is a fresh `python -m prefect.engine`; "
                                  "first job of a fresh stack (tiny model not yet built), then the same job again",
                  "warm_runner": "DREAMFLOW_WARM_RUNNER=true (default): each flow run is forked from the warm "
                                 "runner after its imports; first job of a fresh stack, then the same job again",
                  "peak_rss": "VmHWM of the flow-run process; a fork's figure counts pages it shares with the runner"},
        "jobs": jobs,
        "warm_runner_rss_mb": warm.get("warm_runner_rss_mb"),
        "target_overhead_s": TARGET_OVERHEAD_S,
        "warm_overhead_median_s": statistics.median(warm_overheads) if warm_overheads else None,
        "warm_overhead_to_model_ready_median_s": statistics.median(ready_overheads) if ready_overheads else None,
        "warm_overhead_meets_target": bool(warm_overheads) and statistics.median(warm_overheads) <= TARGET_OVERHEAD_S,
        "warm_overhead_without_sample_render_median_s": statistics.median(unrendered) if unrendered else None,
    }
    path = write_result("pipeline", body, load_before)
    sys.stdout.write(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
