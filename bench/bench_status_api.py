"""Benchmark: the status endpoint at 50 concurrent clients, on the whole stack.

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_status_api.py [--clients 50 --requests 3000 --seconds 20]``.
Writes ``bench/results/status_api.json`` and prints it.

It starts the stack (Prefect server, one process worker, facade; local storage, free ports, a
temporary data folder), creates one sandbox training from a sample photo and waits for it to
finish, then sends POST /api/v3/fine_tune_status/<id> over ``--clients`` keep-alive connections
for ``--seconds`` with wrk (Debian's ``wrk`` package; a C load generator that leaves the CPU to the
server). Without wrk, or with ``--httpx``, ``--clients`` coroutines over one httpx.AsyncClient
send until ``--requests`` are done: that client saturates a core first, so those figures are a
floor. To show where the time goes it also measures, one at a time and at the same concurrency:

- ``facade_floor``: the same route with an unknown key (401 before any Prefect or store call; the
  status fast path of ``api/fastpath.py`` answers it, as it answers the cached status polls);
- ``status_via_fastapi_route``: the same status request sent as a form, which the fast path hands to
  FastAPI's route (routing, dependencies, the route function): what a poll costs without the fast path;
- ``prefect_filter``: the Prefect REST call the facade makes per status request, sent directly;
- ``gateway_find_training_in_process``: that call through the facade's PrefectGateway (Prefect
  client, FlowRun parsing), in this process;
- ``store_reads``: the two local-store reads (status record and manifest), in-process.

The stack is stopped at the end whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchresults import load_average, write_result
from benchstack import (
    KEY,
    base_url,
    create_sandbox,
    jpeg_data_uri,
    start_bench_stack,
    wait_until_done,
)

from flows.settings import Settings, hash_key

TARGET_RPS = 1000.0
TARGET_P99_MS = 50.0


@dataclass
class Load:
    """Outcome of one load phase."""

    latencies_s: list[float] = field(default_factory=list)
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0

    def record_error(self, kind: str) -> None:
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1

    def summary(self) -> dict[str, Any]:
        done = len(self.latencies_s) + self.errors
        ordered = sorted(self.latencies_s)
        return {
            "requests": done, "ok": len(ordered), "errors": self.errors, "error_kinds": self.error_kinds,
            "wall_s": self.wall_s, "requests_per_second": done / self.wall_s if self.wall_s else 0.0,
            "p50_ms": 1000 * percentile(ordered, 50), "p90_ms": 1000 * percentile(ordered, 90),
            "p99_ms": 1000 * percentile(ordered, 99), "max_ms": 1000 * ordered[-1] if ordered else 0.0,
        }


def percentile(ordered: list[float], pct: float) -> float:
    """Nearest-rank percentile of sorted values (0.0 when empty)."""
    if not ordered:
        return 0.0
    rank = max(0, min(len(ordered) - 1, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


async def hammer(url: str, body: dict, expect: int, clients: int, total: int, seconds: float) -> Load:
    """``clients`` coroutines POST ``body`` to ``url`` until ``total`` requests or ``seconds`` pass."""
    load = Load()
    issued = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        started = time.perf_counter()
        deadline = started + seconds

        async def one_client() -> None:
            nonlocal issued
            while issued < total and time.perf_counter() < deadline:
                issued += 1
                begin = time.perf_counter()
                try:
                    response = await client.post(url, json=body)
                except httpx.HTTPError as exc:
                    load.record_error(type(exc).__name__)
                    continue
                if response.status_code == expect:
                    load.latencies_s.append(time.perf_counter() - begin)
                else:
                    load.record_error(f"http {response.status_code}")

        await asyncio.gather(*(one_client() for _ in range(clients)))
        load.wall_s = time.perf_counter() - started
    return load


WRK_SCRIPT = """wrk.method = "POST"
wrk.body = '%s'
wrk.headers["Content-Type"] = "%s"
"""
WRK_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def wrk_load(url: str, body: dict, clients: int, seconds: float, threads: int = 1, form: bool = False) -> dict[str, Any]:
    """``clients`` keep-alive connections from wrk (C, event loop) for ``seconds``; its rate and percentiles.

    The body goes as JSON, or form-encoded with ``form``."""
    import json
    import re
    import subprocess
    from urllib.parse import urlencode

    encoded = (urlencode(body), "application/x-www-form-urlencoded") if form else (json.dumps(body), "application/json")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT % encoded)
    command = ["wrk", f"-t{threads}", f"-c{clients}", f"-d{int(seconds)}s", "--latency", "-s", script.name, url]
    output = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    Path(script.name).unlink()

    def latency_ms(label: str) -> float:
        value, unit = re.search(rf"^\s+{label}\s+([\d.]+)(us|ms|s)\s*$", output, re.MULTILINE).groups()
        return float(value) * WRK_UNITS[unit]

    total = int(re.search(r"(\d+) requests in", output).group(1))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = re.search(r"Socket errors: (.*)", output)
    return {
        "tool": " ".join(command[:-3] + ["<post body>", "URL"]), "requests": total,
        "non_2xx": int(non_2xx.group(1)) if non_2xx else 0, "socket_errors": errors.group(1) if errors else None,
        "requests_per_second": float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)),
        "p50_ms": latency_ms("50%"), "p90_ms": latency_ms("90%"), "p99_ms": latency_ms("99%"),
    }


def sequential_ms(call: Callable[[], object], count: int) -> dict[str, float]:
    """Median and p90 milliseconds of ``count`` calls one after another (after one warm-up)."""
    call()
    times = []
    for _ in range(count):
        begin = time.perf_counter()
        call()
        times.append(time.perf_counter() - begin)
    ordered = sorted(times)
    return {"calls": count, "median_ms": 1000 * statistics.median(ordered), "p90_ms": 1000 * percentile(ordered, 90)}


def prefect_filter_body(training_id: str) -> dict:
    """The flow-run filter the facade's gateway sends for one status request."""
    tags = [f"training:{training_id}", f"owner:{hash_key(KEY)}"]
    return {"flow_runs": {"tags": {"all_": tags}}, "limit": 10}


def gateway_find_ms(settings: Settings, training_id: str, count: int) -> dict[str, float]:
    """The facade's own Prefect call (PrefectGateway.find_training: HTTP + FlowRun parsing), in-process."""
    from api.gateway import PrefectGateway

    async def timed() -> list[float]:
        times = []
        async with PrefectGateway(settings.prefect_api) as gateway:
            for _ in range(count + 1):
                begin = time.perf_counter()
                await gateway.find_training(training_id, hash_key(KEY))
                times.append(time.perf_counter() - begin)
        return sorted(times[1:])

    ordered = asyncio.run(timed())
    return {"calls": count, "median_ms": 1000 * statistics.median(ordered), "p90_ms": 1000 * percentile(ordered, 90)}


def one_at_a_time(settings: Settings, training_id: str, count: int) -> dict[str, Any]:
    """Sequential latencies of the whole request and of its parts."""
    from flows.records import read_manifest, read_stage
    from flows.store import store_from_settings

    store = store_from_settings(settings)
    status_url = f"{base_url(settings)}/api/v3/fine_tune_status/{training_id}"
    with httpx.Client(timeout=30) as client:
        return {
            "status_request": sequential_ms(lambda: client.post(status_url, json={"key": KEY}), count),
            "facade_floor_401": sequential_ms(lambda: client.post(status_url, json={"key": "wrong"}), count),
            "prefect_filter": sequential_ms(
                lambda: client.post(f"{settings.prefect_api}/flow_runs/filter", json=prefect_filter_body(training_id)),
                count),
            "gateway_find_training_in_process": gateway_find_ms(settings, training_id, count),
            "store_reads": sequential_ms(lambda: (read_stage(store, training_id), read_manifest(store, training_id)),
                                         count),
        }


def measure(settings: Settings, training_id: str, args: argparse.Namespace) -> dict[str, Any]:
    """The status route, the same route's 401 floor and the Prefect query behind it, under load."""
    status_url = f"{base_url(settings)}/api/v3/fine_tune_status/{training_id}"
    prefect_url = f"{settings.prefect_api}/flow_runs/filter"
    if shutil.which("wrk") and not args.httpx:
        status = wrk_load(status_url, {"key": KEY}, args.clients, args.seconds)
        floor = wrk_load(status_url, {"key": "wrong"}, args.clients, min(args.seconds, 10))
        via_route = wrk_load(status_url, {"key": KEY}, args.clients, min(args.seconds, 10), form=True)
        prefect = wrk_load(prefect_url, prefect_filter_body(training_id), args.clients, min(args.seconds, 10))
    else:  # the Python client saturates a core long before the facade does; figures are a floor
        floor_total = min(args.requests, 1000)
        status = asyncio.run(hammer(status_url, {"key": KEY}, 200, args.clients, args.requests, args.seconds)).summary()
        floor = asyncio.run(hammer(status_url, {"key": "wrong"}, 401, args.clients, floor_total, args.seconds)).summary()
        via_route = None
        prefect = asyncio.run(hammer(prefect_url, prefect_filter_body(training_id), 200, args.clients, floor_total,
                                     args.seconds)).summary()
    return {"status_endpoint": status,
            "facade_floor_401_same_route": floor,
            **({"status_via_fastapi_route_form_body": via_route} if via_route else {}),
            "prefect_flow_run_filter_direct": prefect,
            "one_at_a_time": one_at_a_time(settings, training_id, 50)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--httpx", action="store_true", help="load from Python (httpx) even when wrk is installed")
    args = parser.parse_args(argv)

    from tasks.sample_photos import write_sample_photos

    load_before = load_average()
    data_dir = Path(tempfile.mkdtemp(prefix="bench-status-"))
    settings, stack = start_bench_stack(data_dir / "data", sandbox_steps=10)
    try:
        photo = write_sample_photos(data_dir / "photos", 1)[0]
        with httpx.Client(base_url=base_url(settings), timeout=60) as client:
            training_id = create_sandbox(client, [jpeg_data_uri(photo)])
            final = wait_until_done(client, training_id, timeout_s=600)
        figures = measure(settings, training_id, args)
    finally:
        stack.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    status = figures["status_endpoint"]
    errors = status.get("errors", 0) + status.get("non_2xx", 0)
    body = {
        "setup": {"clients": args.clients, "max_requests": args.requests, "max_seconds": args.seconds,
                  "client": (figures["status_endpoint"].get("tool") or "one httpx.AsyncClient in one asyncio process")
                  + ", on the same machine",
                  "server": "uvicorn (httptools, uvloop), 1 process, status fast path (api/fastpath.py); "
                            "Prefect server (SQLite); local storage",
                  "training_status_during_load": final.get("training_status")},
        **figures,
        "targets": {"requests_per_second": TARGET_RPS, "p99_ms": TARGET_P99_MS},
        "meets_targets": status["requests_per_second"] >= TARGET_RPS and status["p99_ms"] < TARGET_P99_MS
        and errors == 0,
    }
    path = write_result("status_api", body, load_before)
    sys.stdout.write(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
