"""The embedded single-machine stack: Prefect server, work pool, deployments, worker, facade.

``dreamflow up`` runs :func:`run_stack`; every process it starts lives in its own process group
and is stopped (SIGTERM, then SIGKILL) when the stack gets SIGINT or SIGTERM.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from deployments.prefect_server import server_command
from flows.settings import STAGE_LOGGER, Settings

log = logging.getLogger("dreamflow.stack")

PROJECT_DIR = Path(__file__).resolve().parent.parent
STOP_GRACE_S = 10.0
RESTART_LIMIT = 3  # exits of one service within the window that stop the stack instead of a restart
RESTART_WINDOW_S = 60.0


class StackError(RuntimeError):
    """A service of the stack did not come up."""


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that were free a moment ago."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def bin_path(name: str) -> str:
    """An executable of this environment (prefect, uvicorn, ...), falling back to PATH."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def dev_key(settings: Settings) -> str:
    """The configured first key, or a generated development key kept in the data dir."""
    configured = [k.strip() for k in settings.api_keys.split(",") if k.strip()]
    if configured:
        return configured[0]
    key_file = settings.resolved_data_dir / "dev-api-key"
    if not key_file.exists():
        key_file.parent.mkdir(parents=True, exist_ok=True)
        key_file.write_text(f"dev-{secrets.token_urlsafe(18)}\n")
        key_file.chmod(0o600)
    return key_file.read_text().strip()


def stack_env(settings: Settings, key: str) -> dict[str, str]:
    """Environment of every child: Prefect pointed at the stack's server, offline hub, the key."""
    data = settings.resolved_data_dir
    env = dict(os.environ)
    env.update(settings_env(settings))
    env.update({
        "PREFECT_HOME": str(data / "prefect"),
        "PREFECT_API_URL": settings.prefect_api,
        "PREFECT_UI_API_URL": settings.prefect_api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        # The worker polls the moment the server announces a run scheduled in its pool
        # (deployments/worker.py); its own polls find runs that come due later (a schedule's) and
        # every run while the event stream is down. Every 0.5 s they cost the idle server 8.6 % of a
        # core, every 5 s 3.4 %.
        "PREFECT_WORKER_QUERY_SECONDS": "5",
        "PREFECT_WORKER_CANCELLATION_POLL_SECONDS": "2",
        # GPU-slot leases on disk (under PREFECT_HOME): a restarted server still knows the slots that
        # running trainings hold, renews and releases them; in memory (the default) they are lost
        # and the slots stay taken for good.
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem",
        "PREFECT_LOGGING_LEVEL": env.get("PREFECT_LOGGING_LEVEL", "INFO"),
        "DREAMFLOW_DATA_DIR": str(data),
        "DREAMFLOW_API_KEYS": settings.api_keys or key,
        "DREAMFLOW_PROJECT_DIR": str(PROJECT_DIR),
        "DREAMFLOW_WORK_POOL": settings.work_pool,
    })
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PREFECT_LOGGING_EXTRA_LOGGERS"] = with_stage_libraries(env.get("PREFECT_LOGGING_EXTRA_LOGGERS", ""))
    if not settings.prefect_api_url:
        env.update(embedded_server_client_env(env))
    return env


def with_stage_libraries(extra_loggers: str) -> str:
    """``PREFECT_LOGGING_EXTRA_LOGGERS`` plus ``tasks``: the loggers of the stages' libraries (the
    engine's checkpoints and resumes, the exports written, a store outage) then reach the run's log
    in the Prefect UI, not only the worker's console."""
    names = [name.strip() for name in extra_loggers.split(",") if name.strip()]
    return ",".join(names if STAGE_LOGGER in names else [*names, STAGE_LOGGER])


def embedded_server_client_env(env: dict[str, str]) -> dict[str, str]:
    """Prefect client settings for the stack's own server, which runs this installation's Prefect.

    Each new Prefect client asks the server's version before its first request and, before its
    first change, for a CSRF token; every flow run builds several clients (engine, task runs, event
    and log workers, the GPU slot). The version cannot differ here, and the server hands out no
    token unless its CSRF protection is on: those answers are known, and a flow run skips 3 to 6
    requests of about 10-30 ms each. A value set in ``env`` is kept."""
    csrf_protected = env.get("PREFECT_SERVER_CSRF_PROTECTION_ENABLED", "").lower() in ("1", "true", "yes", "on")
    known = {"PREFECT_CLIENT_SERVER_VERSION_CHECK_ENABLED": "false"}
    if not csrf_protected:
        known["PREFECT_CLIENT_CSRF_SUPPORT_ENABLED"] = "false"
    return {name: env.get(name, value) for name, value in known.items()}


def settings_env(settings: Settings) -> dict[str, str]:
    """The settings as ``DREAMFLOW_*`` variables, so every child process sees the same ones."""
    values = settings.model_dump(exclude={"api_key_hashes"}, exclude_none=True)
    return {f"DREAMFLOW_{name.upper()}": str(value).lower() if isinstance(value, bool) else str(value)
            for name, value in values.items()}


def wait_http(url: str, timeout_s: float, process: subprocess.Popen | None = None) -> None:
    """Poll ``url`` until it answers below 500, the process exits, or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise StackError(f"{url}: the process exited with code {process.returncode}")
        try:
            if httpx.get(url, timeout=2.0).status_code < 500:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise StackError(f"{url} did not answer within {timeout_s:.0f} s")


@dataclass
class Stack:
    """The processes of one ``dreamflow up``."""

    settings: Settings
    env: dict[str, str]
    log_dir: Path
    processes: list[tuple[str, subprocess.Popen]] = field(default_factory=list)
    recovered: list[str] = field(default_factory=list)  # runs the last stop had interrupted, and what became of them
    commands: dict[str, list[str]] = field(default_factory=dict)
    exits: dict[str, list[float]] = field(default_factory=dict)  # when each service last exited
    old_groups: list[subprocess.Popen] = field(default_factory=list)  # of services since started again

    def spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        """Start a long-running service in its own process group, logging to the data dir."""
        proc = self._start(name, args)
        self.processes.append((name, proc))
        self.commands[name] = args
        return proc

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log_file = (self.log_dir / f"{name}.log").open("ab")
        proc = subprocess.Popen(args, env=self.env, cwd=PROJECT_DIR, stdout=log_file, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        log.info("started %s (pid %d), log %s", name, proc.pid, log_file.name)
        return proc

    def supervise(self) -> list[str]:
        """Start again each service that has exited (the facade, a worker, the warm runner, the Prefect
        server), so one crash does not stop the others and the trainings they run; a service that
        exits ``RESTART_LIMIT`` times within ``RESTART_WINDOW_S`` is a StackError. Returns what was
        started again.

        A dead service's process group is not signalled: a worker's flow runs live on in it and
        finish their trainings; :meth:`stop` ends them with the rest."""
        again = []
        now = time.monotonic()
        for index, (name, proc) in enumerate(self.processes):
            if proc.poll() is None:
                continue
            exits = [t for t in self.exits.get(name, []) if now - t < RESTART_WINDOW_S] + [now]
            self.exits[name] = exits
            if len(exits) > RESTART_LIMIT:
                raise StackError(f"{name} exited with code {proc.returncode} {len(exits)} times within "
                                 f"{RESTART_WINDOW_S:.0f} s; see {self.log_dir / name}.log")
            log.warning("%s exited with code %s; starting it again", name, proc.returncode)
            self.old_groups.append(proc)
            self.processes[index] = (name, self._start(name, self.commands[name]))
            again.append(name)
        return again

    def run(self, args: list[str], timeout_s: float = 120.0) -> None:
        """Run a one-off command (work pool, deploy) and fail loudly with its output."""
        done = subprocess.run(args, env=self.env, cwd=PROJECT_DIR, capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0:
            raise StackError(f"{' '.join(args[:3])} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")

    def retire(self, name: str) -> None:
        """Stop one service for good: supervision no longer starts it again."""
        for index, (known, proc) in enumerate(self.processes):
            if known == name:
                del self.processes[index]
                self.commands.pop(name, None)
                _signal_group(proc, signal.SIGTERM)
                _reap(name, proc, time.monotonic() + STOP_GRACE_S)
                return

    def stop(self) -> None:
        """SIGTERM every process group, newest first; SIGKILL whatever outlives the grace period."""
        for proc in self.old_groups:  # what is left of services that died (a dead worker's flow runs)
            _signal_group(proc, signal.SIGTERM)
        for _, proc in reversed(self.processes):
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for name, proc in reversed(self.processes):
            _reap(name, proc, deadline)
        for proc in self.old_groups:
            _signal_group(proc, signal.SIGKILL)
        self.processes.clear()
        self.old_groups.clear()


def _reap(name: str, proc: subprocess.Popen, deadline: float) -> None:
    """Wait for a signalled service until ``deadline``; SIGKILL its group if it is still there."""
    try:
        proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        log.warning("%s did not stop in time; killing it", name)
        _signal_group(proc, signal.SIGKILL)
        proc.wait()


def _signal_group(proc: subprocess.Popen, sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def worker_command(settings: Settings, index: int) -> list[str]:
    """A process worker of the pool that runs at most ``worker_runs`` flow runs at once."""
    return [sys.executable, "-m", "deployments.worker", "--pool", settings.work_pool, "--type", "process",
            "--name", f"dreamflow-worker-{index}", "--limit", str(settings.worker_runs)]


def runner_socket(settings: Settings) -> str:
    """Where this installation's warm runner listens: short (Unix socket paths), one per data folder."""
    digest = hashlib.sha256(str(settings.resolved_data_dir).encode()).hexdigest()[:12]
    return str(Path(tempfile.gettempdir()) / f"dreamflow-runner-{digest}.sock")


def launch_command(settings: Settings) -> str | None:
    """The pool's flow-run command: through the warm runner, or None for Prefect's cold default."""
    if not settings.warm_runner:
        return None
    # -S: the launcher needs the standard library only; without site-packages it starts in 27 ms, not 44
    return shlex.join([sys.executable, "-S", str(PROJECT_DIR / "deployments" / "launch.py"), runner_socket(settings)])


def start_stack(settings: Settings, workers: int = 1) -> Stack:
    """Bring every service up and return once the facade answers."""
    key = dev_key(settings)
    data = settings.resolved_data_dir
    (data / "logs").mkdir(parents=True, exist_ok=True)
    stack = Stack(settings, stack_env(settings, key), data / "logs")
    prefect = bin_path("prefect")
    try:
        if settings.warm_runner:  # imports torch & co. while the server starts; runs fall back to cold until ready
            stack.spawn("warm-runner", [sys.executable, "-m", "deployments.warm_runner", runner_socket(settings)])
        if not settings.prefect_api_url:
            server = stack.spawn("prefect-server", server_command(settings.prefect_port))
            wait_http(f"{settings.prefect_api}/health", 90, server)
        _prepare_pool_and_deployments(stack, prefect)
        if not settings.prefect_api_url:  # its own server: every run of the pool was this machine's
            from deployments.pool import recover_interrupted_runs

            stack.recovered = recover_interrupted_runs(settings.prefect_api, settings.work_pool)
            for line in stack.recovered:
                log.info("interrupted run %s", line)
        for index in range(workers):
            stack.spawn(f"worker-{index}", worker_command(settings, index))
        facade = stack.spawn("facade", [bin_path("uvicorn"), "api.app:create_app", "--factory", "--host",
                                        settings.api_host, "--port", str(settings.api_port), "--no-access-log"])
        wait_http(f"http://{settings.api_host}:{settings.api_port}/docs", 60, facade)
    except BaseException:
        stack.stop()
        raise
    return stack


def _prepare_pool_and_deployments(stack: Stack, prefect: str) -> None:
    from deployments.pool import (
        prepare_crash_recovery,
        prepare_orchestration,
        restore_schedule_states,
        schedule_states,
    )

    prepare_orchestration(stack.settings.prefect_api, stack.settings.work_pool, stack.settings.gpu_slots,
                          launch_command(stack.settings))
    schedules = schedule_states(stack.settings.prefect_api)  # as the UI left them
    stack.run([prefect, "--no-prompt", "deploy", "--all"], timeout_s=180)
    restore_schedule_states(stack.settings.prefect_api, schedules)
    prepare_crash_recovery(stack.settings.prefect_api)


def storage_state(settings: Settings) -> str:
    """One line on the configured store: reachable and writable, or why not (say, refused credentials),
    so a wrong setting shows at start-up rather than as 503s later."""
    from flows.store import StorageError, store_from_settings

    try:
        store_from_settings(settings).check()
    except (StorageError, ValueError) as exc:
        return f"{settings.storage}: NOT AVAILABLE: {exc}"
    return f"{settings.storage}: ok"


def run_stack(settings: Settings, workers: int = 1) -> None:
    """``dreamflow up``: start everything, print where it is, stop it all on SIGINT/SIGTERM."""
    stopping = {"now": False}

    def request_stop(signum: int, frame: object) -> None:
        stopping["now"] = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    stack = start_stack(settings, workers)
    key = dev_key(settings)
    sys.stdout.write(
        f"dreamflow is up\n  facade      http://{settings.api_host}:{settings.api_port}  (OpenAPI at /docs)\n"
        f"  Prefect UI  {settings.prefect_api.removesuffix('/api')}\n  API key     {key}\n"
        f"  storage     {storage_state(settings)}\n"
        f"  logs        {stack.log_dir}\n"
        + "".join(f"  interrupted {line}\n" for line in stack.recovered)  # by the last stop
        + "Press Ctrl+C to stop.\n"
    )
    sys.stdout.flush()
    try:
        while not stopping["now"]:
            for name in stack.supervise():
                sys.stdout.write(f"{name} exited; started again (see {stack.log_dir / name}.log)\n")
                sys.stdout.flush()
            time.sleep(0.5)
    finally:
        stack.stop()
        sys.stdout.write("dreamflow stopped\n")
