"""Starting deployments and reading flow runs through the Prefect API, as the UI or a schedule does."""

from __future__ import annotations

import asyncio
import time
from typing import Any
from uuid import UUID

from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.responses import DeploymentResponse

FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def read_deployment(api_url: str, name: str) -> DeploymentResponse:
    """The deployment ``<flow name>/<deployment name>`` as the server stores it."""
    async def read() -> DeploymentResponse:
        async with PrefectClient(api_url) as client:
            return await client.read_deployment_by_name(name)

    return asyncio.run(read())


def start_deployment(api_url: str, name: str, parameters: dict[str, Any]) -> UUID:
    """Create a flow run of a deployment with only parameters, as the UI's "Run" form does."""
    async def create() -> UUID:
        async with PrefectClient(api_url) as client:
            deployment = await client.read_deployment_by_name(name)
            run = await client.create_flow_run_from_deployment(deployment.id, parameters=parameters)
            return run.id

    return asyncio.run(create())


def start_deployment_run(api_url: str, name: str, parameters: dict[str, Any], tags: list[str],
                         job_variables: dict[str, Any]) -> UUID:
    """Create a flow run of a deployment with extra tags and job variables (say, another command)."""
    async def create() -> UUID:
        async with PrefectClient(api_url) as client:
            deployment = await client.read_deployment_by_name(name)
            run = await client.create_flow_run_from_deployment(
                deployment.id, parameters=parameters, tags=list(dict.fromkeys([*deployment.tags, *tags])), job_variables=job_variables)
            return run.id

    return asyncio.run(create())


def state_history(api_url: str, run_id: UUID) -> list[str]:
    """The flow run's state names, oldest first."""
    async def read() -> list[str]:
        async with PrefectClient(api_url) as client:
            return [state.name or state.type.value for state in await client.read_flow_run_states(run_id)]

    return asyncio.run(read())


def read_flow_run(api_url: str, run_id: UUID) -> FlowRun:
    async def read() -> FlowRun:
        async with PrefectClient(api_url) as client:
            return await client.read_flow_run(run_id)

    return asyncio.run(read())


def wait_for_final(api_url: str, run_id: UUID, timeout_s: float = 300) -> FlowRun:
    """Poll the flow run until it reaches a final state."""
    deadline = time.monotonic() + timeout_s
    while True:
        run = read_flow_run(api_url, run_id)
        if run.state is not None and run.state.type.value in FINAL:
            return run
        if time.monotonic() > deadline:
            raise AssertionError(f"flow run {run.name} not final after {timeout_s} s: {run.state}")
        time.sleep(0.5)


def wait_for_log(api_url: str, run_id: UUID, text: str, timeout_s: float = 20) -> list[str]:
    """The run's log messages once one contains ``text`` (the worker ships logs in batches, so they
    may reach the server after the final state)."""
    deadline = time.monotonic() + timeout_s
    while True:
        messages = run_messages(api_url, run_id)
        if any(text in line for line in messages):
            return messages
        if time.monotonic() > deadline:
            raise AssertionError(f"no log line with {text!r} after {timeout_s} s; got {messages[-5:]}")
        time.sleep(0.5)


def run_messages(api_url: str, run_id: UUID) -> list[str]:
    """Every log message of a flow run (and its task runs), oldest first."""
    async def read() -> list[str]:
        async with PrefectClient(api_url) as client:
            logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
            return [entry.message for entry in logs]

    return asyncio.run(read())
