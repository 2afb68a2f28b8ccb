"""Benchmark: what Prefect's flow-run heartbeat thread adds to the end of a sync flow run.

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_heartbeat.py [--rounds 3]``.
Writes ``bench/results/heartbeat.json`` and prints it.

A sync flow joins its heartbeat thread on exit (``prefect.flow_engine._send_heartbeats``, join
timeout 2 s, the thread sleeps in 1 s steps); an async flow does not. Both flows here call one
trivial task; each is timed from its call to its return and from the end of its body to its
return. It runs against Prefect's ephemeral API (a temporary PREFECT_HOME): the first call pays
that server's start and is reported apart.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchresults import load_average, write_result

BODY_END: dict[str, float] = {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    load_before = load_average()
    os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="bench-heartbeat-"))
    os.environ.pop("PREFECT_API_URL", None)

    from prefect import flow, task

    @task
    def trivial() -> int:
        return 1

    @flow
    def sync_flow() -> None:
        trivial()
        BODY_END["t"] = time.perf_counter()

    @flow
    async def async_flow() -> None:
        trivial()
        BODY_END["t"] = time.perf_counter()

    def timed(kind: str) -> tuple[float, float]:
        started = time.perf_counter()
        sync_flow() if kind == "sync" else asyncio.run(async_flow())
        ended = time.perf_counter()
        return ended - started, ended - BODY_END["t"]

    first_call_s, _ = timed("sync")  # starts the ephemeral server
    runs: dict[str, list[tuple[float, float]]] = {"sync": [], "async": []}
    for _ in range(args.rounds):
        for kind in runs:
            runs[kind].append(timed(kind))
    figures = {
        kind: {"median_call_s": statistics.median(c for c, _ in values),
               "median_after_body_s": statistics.median(a for _, a in values),
               "runs": [{"call_s": c, "after_body_s": a} for c, a in values]}
        for kind, values in runs.items()
    }
    body = {"setup": {"rounds": args.rounds, "api": "Prefect ephemeral server (temporary PREFECT_HOME)",
                      "first_call_with_server_start_s": first_call_s},
            "flows": figures,
            "heartbeat_join_s": figures["sync"]["median_after_body_s"] - figures["async"]["median_after_body_s"]}
    path = write_result("heartbeat", body, load_before)
    sys.stdout.write(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
