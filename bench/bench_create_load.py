"""Benchmark: 200 concurrent create requests against the queue limit, on the whole stack.

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_create_load.py [--requests 200 --limit 20]``.
Writes ``bench/results/create_load.json`` and prints it.

It starts the stack with ``DREAMFLOW_MAX_QUEUED=--limit`` and no worker (every accepted training
stays queued, so the limit is reached and nothing trains), then sends ``--requests`` sandbox create
requests at once, each with a small JPEG inline as a data: URI, from one httpx.AsyncClient. It checks
that every answer is 201 with a new id or 429 with Retry-After, that exactly ``--limit`` were
accepted, and that each accepted id has its flow run in Prefect (no job lost). Then it cancels every
accepted training through the API, checks that a create is accepted again afterwards, and stops
the stack. Figures: accepted / refused counts, wall time, p50/p90/p99/max
latency of all answers, of the 201s and of the 429s.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchresults import load_average, write_result
from benchstack import KEY, base_url, start_bench_stack

from api.admission import FULL_FRESH_S

CREATE_PATH = "/api/sandbox/v3/fine_tune"
REQUEST_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Outcome:
    """One create request's answer."""

    status: int
    latency_s: float
    training_id: str | None
    retry_after: str | None
    error_shape: bool


def small_jpeg_data_uri(side: int = 64) -> str:
    """A ``side`` x ``side`` JPEG as a data: URI (a few hundred bytes)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (180, 140, 120)).save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def create_body(key: str, image: str, index: int) -> dict[str, Any]:
    return {"key": key, "instance_prompt": f"photo of sks{index} person", "class_prompt": "photo of person",
            "images": [image], "seed": str(index), "training_type": "null", "webhook": None}


async def _one(client: httpx.AsyncClient, body: dict[str, Any]) -> Outcome:
    began = time.perf_counter()
    response = await client.post(CREATE_PATH, json=body)
    latency = time.perf_counter() - began
    try:
        answer = response.json()
    except ValueError:
        answer = {}
    error_shape = answer.get("status") == "error" and bool(answer.get("message")) and answer.get("messege") == answer.get("message")
    return Outcome(response.status_code, latency, answer.get("training_id"), response.headers.get("retry-after"),
                   error_shape)


async def send_creates(url: str, key: str, count: int) -> tuple[list[Outcome], float]:
    """``count`` create requests sent at once (one connection each); the outcomes and the wall time."""
    image = small_jpeg_data_uri()
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        began = time.perf_counter()
        outcomes = await asyncio.gather(*(_one(client, create_body(key, image, i)) for i in range(count)))
        return list(outcomes), time.perf_counter() - began


def percentile(ordered: list[float], pct: float) -> float:
    """Nearest-rank percentile of sorted values (0.0 when empty)."""
    if not ordered:
        return 0.0
    rank = max(0, min(len(ordered) - 1, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def latency_ms(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {name: round(1000 * percentile(ordered, pct), 1) for name, pct in
            (("p50_ms", 50), ("p90_ms", 90), ("p99_ms", 99), ("max_ms", 100))}


def summarize(outcomes: list[Outcome], wall_s: float) -> dict[str, Any]:
    """Counts by status and the latency percentiles of all answers, of the 201s and of the 429s."""
    by_status: dict[str, int] = {}
    for outcome in outcomes:
        by_status[str(outcome.status)] = by_status.get(str(outcome.status), 0) + 1
    return {
        "requests": len(outcomes), "accepted": by_status.get("201", 0), "refused_429": by_status.get("429", 0),
        "status_codes": dict(sorted(by_status.items())), "wall_s": round(wall_s, 2),
        "latency_all": latency_ms([o.latency_s for o in outcomes]),
        "latency_201": latency_ms([o.latency_s for o in outcomes if o.status == 201]),
        "latency_429": latency_ms([o.latency_s for o in outcomes if o.status == 429]),
    }


def problems(outcomes: list[Outcome]) -> list[str]:
    """What breaks the contract: answers other than 201/429, repeated ids, 429s without Retry-After or shape."""
    found = [f"unexpected HTTP {o.status}" for o in outcomes if o.status not in (201, 429)]
    ids = [o.training_id for o in outcomes if o.status == 201]
    if None in ids or len(set(ids)) != len(ids):
        found.append(f"201 ids missing or repeated: {len(ids)} answers, {len(set(ids))} distinct")
    found += [f"429 without a numeric Retry-After or the error shape: {o}" for o in outcomes
              if o.status == 429 and not ((o.retry_after or "").isdigit() and o.error_shape)]
    return found


def flow_runs_named(prefect_api: str, names: list[str]) -> dict[str, str]:
    """Name -> state type of the flow runs with these names, straight from Prefect's REST API."""
    found: dict[str, str] = {}
    for start in range(0, len(names), 100):
        response = httpx.post(f"{prefect_api}/flow_runs/filter", timeout=30, json={
            "flow_runs": {"name": {"any_": names[start:start + 100]}}, "limit": 200})
        response.raise_for_status()
        found.update({run["name"]: run["state_type"] for run in response.json()})
    return found


async def cancel_all(url: str, key: str, training_ids: list[str]) -> list[int]:
    """Cancel each training through the API, all at once; the status codes."""
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S) as client:
        responses = await asyncio.gather(*(client.post(f"/api/v3/cancel_training/{tid}", json={"key": key})
                                           for tid in training_ids))
    return [r.status_code for r in responses]


def run(requests: int, limit: int, work_dir: Path) -> dict[str, Any]:
    """Start a worker-less stack with the limit, load it, check, cancel; the figures and the checks."""
    settings, stack = start_bench_stack(work_dir / "data", workers=0, max_queued=limit)
    try:
        url = base_url(settings)
        outcomes, wall_s = asyncio.run(send_creates(url, KEY, requests))
        accepted = [o.training_id for o in outcomes if o.status == 201 and o.training_id]
        runs = flow_runs_named(settings.prefect_api, accepted)
        cancelled = asyncio.run(cancel_all(url, KEY, accepted))
        time.sleep(FULL_FRESH_S + 0.5)  # the facade trusts a "queue full" count this long
        after_cancel, _ = asyncio.run(send_creates(url, KEY, 1))
        asyncio.run(cancel_all(url, KEY, [o.training_id for o in after_cancel if o.training_id]))
    finally:
        stack.stop()
    found = problems(outcomes)
    if len(accepted) != limit:
        found.append(f"{len(accepted)} accepted, the limit is {limit}")
    lost = sorted(set(accepted) - set(runs))
    if lost:
        found.append(f"accepted without a flow run: {lost}")
    if any(code != 200 for code in cancelled):
        found.append(f"cancel answers {sorted(set(cancelled))}")
    if [o.status for o in after_cancel] != [201]:
        found.append(f"after cancelling, a create got {[o.status for o in after_cancel]}")
    return {
        **summarize(outcomes, wall_s),
        "flow_runs_of_accepted": len(runs), "flow_run_states": sorted(set(runs.values())),
        "cancelled_ok": sum(code == 200 for code in cancelled),
        "create_after_cancel": [o.status for o in after_cancel],
        "problems": found,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--limit", type=int, default=20)
    args = parser.parse_args(argv)

    load_before = load_average()
    work_dir = Path(tempfile.mkdtemp(prefix="bench-create-"))
    try:
        figures = run(args.requests, args.limit, work_dir)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    body = {
        "setup": {"requests": args.requests, "max_queued": args.limit, "endpoint": CREATE_PATH,
                  "client": "one httpx.AsyncClient, all requests at once, one connection each, same machine",
                  "server": "uvicorn, 1 process; Prefect server (SQLite); local storage; no worker",
                  "image": "one 64x64 JPEG (the smallest the facade accepts) inline as a data: URI per request"},
        **figures,
        "meets_contract": not figures["problems"],
    }
    path = write_result("create_load", body, load_before)
    sys.stdout.write(path.read_text())
    return 0 if not figures["problems"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
