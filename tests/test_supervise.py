"""`dreamflow up` keeps its services up: one that dies is started again, and the others (with the
trainings a worker runs) carry on; one that keeps dying stops the stack with the reason."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import httpx
import pytest
from stackserver import KEYS, RunningStack

from deployments.stack import RESTART_LIMIT, Stack, StackError
from flows.settings import Settings


def test_a_killed_facade_is_started_again_and_answers(stack: RunningStack) -> None:
    name_to_pid = {name: proc.pid for name, proc in stack.stack.processes}
    others = {name: pid for name, pid in name_to_pid.items() if name != "facade"}
    os.kill(name_to_pid["facade"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    again: list[str] = []
    while not again and time.monotonic() < deadline:
        again = stack.stack.supervise()
        time.sleep(0.1)
    assert again == ["facade"]
    deadline = time.monotonic() + 60
    while True:
        try:
            answer = httpx.post(f"{stack.base_url}/api/v3/finetune_list", json={"key": KEYS[0]}, timeout=5)
            break
        except httpx.TransportError:
            assert time.monotonic() < deadline, "the facade did not come back"
            time.sleep(0.3)
    assert answer.status_code == 200 and answer.json()["messege"] == "model list"
    running = {name: proc.pid for name, proc in stack.stack.processes}
    assert {name: running[name] for name in others} == others  # nothing else was touched
    assert running["facade"] != name_to_pid["facade"]


def test_a_service_that_keeps_dying_stops_the_stack_with_the_reason(tmp_path: Path) -> None:
    stack = Stack(Settings(data_dir=tmp_path), dict(os.environ), tmp_path)
    stack.spawn("flaky", [sys.executable, "-c", "raise SystemExit(3)"])
    try:
        restarts = 0
        with pytest.raises(StackError, match=r"flaky exited with code 3 4 times within 60 s"):
            for _ in range(200):
                restarts += len(stack.supervise())
                time.sleep(0.05)
        assert restarts == RESTART_LIMIT
    finally:
        stack.stop()
