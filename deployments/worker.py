"""The stack's worker: Prefect's process worker, which also looks for work the moment a run is scheduled.

A Prefect worker finds new flow runs by polling its work pool every ``PREFECT_WORKER_QUERY_SECONDS``,
so a run waits for the next poll: half the interval on average. This worker also subscribes to the
server's event stream and polls at once when the server announces a flow run scheduled in its pool
(a REST call to the facade, a run started from the UI, a retry, a crashed run rescheduled). Its
regular polls go on as before, so a worker whose event stream is down still finds every run; the
stack polls less often with it.

Everything else is Prefect's: ``prefect worker start`` starts it (``python -m deployments.worker``
takes the same options), with the same pool checks, signal handling and flow-run processes.

    python -m deployments.worker --pool dreamflow --type process --name gpu-0 --limit 2
"""

from __future__ import annotations

import asyncio
import sys
import warnings
from collections.abc import Callable
from typing import Any

import anyio
from prefect.logging import get_logger
from prefect.workers.process import ProcessWorker

log = get_logger("dreamflow.worker")  # "prefect.dreamflow.worker": logged as the worker's own lines are

FLOW_RUN_EVENTS = "prefect.flow-run."  # a flow run's state changes: prefect.flow-run.<state name>
RESUBSCRIBE_S = 5.0  # after the event stream failed; the worker's own polls go on meanwhile
REMEMBERED_SETTINGS = 256  # settings objects (and their nested parts) whose environment is kept


def wakes(event: Any, pool: str) -> bool:
    """Whether ``event`` announces a flow run scheduled in the work pool named ``pool``: a new run, or
    one to run again (Scheduled, AwaitingRetry, a crashed run rescheduled...)."""
    return event.event.startswith(FLOW_RUN_EVENTS) and event.resource.get("prefect.state-type") == "SCHEDULED" and any(
        resource.get("prefect.resource.role") == "work-pool" and resource.get("prefect.resource.name") == pool
        for resource in event.related
    )


async def poll_when_woken(wake: asyncio.Event, poll: Callable[[], Any]) -> None:
    """``poll()`` each time ``wake`` is set; wake-ups during a poll make one more poll after it."""
    while True:
        await wake.wait()
        wake.clear()
        try:
            await poll()
        except Exception:  # a failed poll is the regular loop's business too; the next wake-up tries again
            log.exception("polling the work pool after a scheduled run failed")


async def subscribe(pool: str, wake: asyncio.Event, resubscribe_s: float = RESUBSCRIBE_S) -> None:
    """Set ``wake`` for every run scheduled in ``pool``, subscribing again whenever the stream fails."""
    from prefect.events.clients import get_events_subscriber
    from prefect.events.filters import EventFilter, EventNameFilter

    while True:
        try:
            runs = EventFilter(event=EventNameFilter(prefix=[FLOW_RUN_EVENTS]))
            async with get_events_subscriber(filter=runs) as events:
                log.info("listening for runs scheduled in work pool %r", pool)
                async for event in events:
                    if wakes(event, pool):
                        wake.set()
        except Exception as exc:  # noqa: BLE001 - the server restarting, a proxy without websockets...
            log.warning("event stream unavailable (%s); polling only, subscribing again in %.0f s", exc, resubscribe_s)
        await asyncio.sleep(resubscribe_s)


with warnings.catch_warnings():  # it takes the "process" type over from Prefect's class, in this process only
    warnings.filterwarnings("ignore", message=".*will be overridden", category=UserWarning)

    class WakingProcessWorker(ProcessWorker):
        """Prefect's process worker, polling as well when its pool gets a newly scheduled run."""

        async def start(self, run_once: bool = False, with_healthcheck: bool = False,
                        printer: Callable[..., None] = print) -> None:
            if run_once:
                await super().start(run_once=True, with_healthcheck=with_healthcheck, printer=printer)
                return
            wake = asyncio.Event()
            async with anyio.create_task_group() as group:
                group.start_soon(subscribe, self._work_pool_name, wake)
                group.start_soon(poll_when_woken, wake, self._poll_if_ready)
                try:
                    await super().start(run_once=False, with_healthcheck=with_healthcheck, printer=printer)
                finally:
                    group.cancel_scope.cancel()

        async def _poll_if_ready(self) -> None:
            if self.is_setup and self._work_pool is not None:  # set up and synced with its pool
                await self.get_and_submit_flow_runs()


def remember_settings_environment() -> None:
    """Make Prefect's settings turn themselves into environment variables once per settings object.

    For each flow run it submits, Prefect's worker turns its whole settings into environment
    variables twice (the job's base environment and the engine command's), about 50 ms each on the
    2-core machine, on the way from Pending to the run's process. A worker's settings do not change
    while it runs; a new settings object (``temporary_settings``, a refreshed context) is a new key.
    """
    from prefect.settings.base import PrefectBaseSettings

    original = PrefectBaseSettings.to_environment_variables
    if getattr(original, "remembers", False):
        return
    remembered: dict[tuple[int, bool, bool, bool], tuple[PrefectBaseSettings, dict[str, str]]] = {}

    def to_environment_variables(self: PrefectBaseSettings, exclude_unset: bool = False, include_secrets: bool = True,
                                 include_aliases: bool = False) -> dict[str, str]:
        key = (id(self), exclude_unset, include_secrets, include_aliases)
        held = remembered.get(key)
        if held is None or held[0] is not self:  # the object held keeps its id from being reused meanwhile
            if len(remembered) >= REMEMBERED_SETTINGS:
                remembered.clear()
            held = remembered[key] = (self, original(self, exclude_unset, include_secrets, include_aliases))
        return dict(held[1])

    to_environment_variables.remembers = True  # type: ignore[attr-defined]
    PrefectBaseSettings.to_environment_variables = to_environment_variables  # type: ignore[method-assign]


def main(argv: list[str]) -> None:
    """``prefect worker start`` with these arguments, ``WakingProcessWorker`` as its process type."""
    from prefect.cli import app

    from deployments import deferred_tls

    deferred_tls.install()  # each flow run's Prefect clients here read no CA bundle for a plain-http API
    remember_settings_environment()
    sys.argv = ["prefect", "worker", "start", *argv]
    app()


if __name__ == "__main__":
    main(sys.argv[1:])
