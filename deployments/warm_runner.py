"""The warm runner: one long-lived process with dreamflow's heavy imports done, forking flow runs.

A flow run of the process worker is normally a fresh ``python -m prefect.engine``: Python, then
Prefect, then torch + diffusers + transformers + peft + facenet-pytorch on first use, in every
job (bench/results/pipeline.json). This process does those imports once and then forks one copy
of itself per flow run, on request of deployments/launch.py, so a warm job starts with them in
memory (shared copy-on-write) instead of importing them again.

Fork safety: the runner stays single-threaded and never runs a tensor operation (no thread pools
exist to be copied half-way); it only imports. Each fork takes the launcher's environment,
working folder and standard streams, takes Prefect's settings for that environment (built ahead
by the runner when an earlier launch had the same one, else afresh; dreamflow reads its own when
it uses them), and runs Prefect's engine exactly as ``python -m prefect.engine`` would.

    python -m deployments.warm_runner /path/to/runner.sock
"""

# ruff: noqa: F401  (preload() imports for the side effect of having imported)
from __future__ import annotations

import gc
import json
import logging
import os
import selectors
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

FORK_TORCH_THREADS = 0  # set by preload()
log = logging.getLogger("dreamflow.warm_runner")
FDS_PER_REQUEST = 4  # stdin, stdout, stderr, lifeline
REAP_EVERY_S = 0.2
# What Prefect's settings are read from besides PREFECT_* variables (their names in any case):
# these files in the working folder, and the profiles file. HOME places the profiles file.
SETTINGS_FILES = (".env", "prefect.toml", "pyproject.toml")


def preload() -> float:
    """Import what flow runs use and load the resident base models; returns the seconds it took."""
    started = time.perf_counter()
    # Nothing here may initialise CUDA (a fork cannot use a CUDA its parent initialised): torch's
    # is_available() then asks NVML, as accelerate's own check does, instead of the CUDA driver.
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
    from deployments import deferred_tls

    deferred_tls.install()  # a run's Prefect clients read no CA bundle for a plain-http API (~0.3 s a job)
    import_job_modules()
    import torch
    from PIL import Image

    from flows.settings import get_settings
    from tasks.resident import preload_models

    Image.preinit()  # the image format plugins every job opens and saves with
    complete_pydantic_models()

    # GNU OpenMP's worker threads do not survive a fork: a fork of a process whose torch ran ops on
    # several threads crawls (about 10x slower here) or hangs in its first parallel op. So the
    # runner loads on one thread, never starts a thread team, and each fork sets the usual count.
    global FORK_TORCH_THREADS
    FORK_TORCH_THREADS = torch.get_num_threads()
    torch.set_num_threads(1)
    preload_models([name.strip() for name in get_settings().resident_models.split(",") if name.strip()])
    # What is here now lives as long as the runner: keep the collector off it, in here and in every
    # fork. A fork's full collections then walk only its own job's objects (about 1.5 s less per
    # job on the 2-core machine: four collections over every imported module's objects), and
    # walking them no longer touches, and so copies, the pages the forks share with the runner.
    gc.collect()
    gc.freeze()
    return time.perf_counter() - started


def import_job_modules() -> None:
    """Import the libraries and modules a flow run uses, so that no fork imports them again."""
    import accelerate
    import facenet_pytorch
    import peft
    import torch
    import transformers
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from accelerate import Accelerator
    from diffusers.training_utils import cast_training_params, compute_snr
    from facenet_pytorch import MTCNN
    from peft import LoraConfig
    from safetensors.torch import load_file, save_file
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    import anyio._backends._asyncio
    import flows.cleanup
    import flows.prefect_once
    import flows.recover
    import flows.retrain
    import flows.training
    import prefect.engine
    import prefect.flow_engine
    import prefect.runner
    import prefect.task_engine
    import prefect.utilities.visualization
    import tasks.convert
    import tasks.faces
    import tasks.kohya
    import tasks.prior
    import tasks.report_plots
    import tasks.sampling
    import tasks.train_engine


def complete_pydantic_models() -> int:
    """Build now the validators of every imported pydantic model that defers building them to its
    first use (most of Prefect's client schemas do): each fork would otherwise build those a run
    uses again, in its first API calls. Returns how many were built."""
    import pydantic

    built, pending = 0, list(pydantic.BaseModel.__subclasses__())
    while pending:
        model = pending.pop()
        pending.extend(model.__subclasses__())
        if getattr(model, "__pydantic_complete__", True):
            continue
        try:
            model.model_rebuild()
        except Exception as exc:  # noqa: BLE001  (a forward reference not importable yet: left to first use)
            log.debug("pydantic model %s left to build on first use: %s", model.__qualname__, exc)
            continue
        built += 1
    return built


class Runner:
    """Accepts launch requests on a Unix socket; forks one run per request and reports its exit."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if os.path.exists(path):
            os.unlink(path)
        self.listener.bind(path)
        os.chmod(path, 0o600)
        self.listener.listen(64)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.runs: dict[int, socket.socket] = {}  # forked pid -> its launcher's connection
        self.stopping = False
        self.settings: SettingsAhead | None = None  # built for the last launch's environment

    def serve(self) -> None:
        while not self.stopping:
            for _key, _events in self.selector.select(timeout=REAP_EVERY_S):
                self.accept()
            self.reap()
        self.close()

    def accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        try:
            context, fds = receive(conn)
        except (OSError, ValueError) as exc:
            log.warning("bad launch request: %s", exc)
            conn.close()
            return
        pid = os.fork()
        if pid == 0:  # the flow run
            self.listener.close()
            for other in self.runs.values():
                other.close()
            run_forked(conn, context, fds, self.settings)  # never returns
        for fd in fds:
            os.close(fd)
        self.runs[pid] = conn
        try:
            conn.sendall(f"{pid}\n".encode())
        except OSError:
            os.kill(pid, signal.SIGKILL)  # the launcher is gone already
        log.info("forked flow run process %d", pid)
        if settings_for(self.settings, context["env"], context["cwd"]) is None:
            # That fork built its own; the next launch with this environment takes these.
            self.settings = build_settings_ahead(context["env"], context["cwd"])

    def reap(self) -> None:
        while self.runs:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.runs.pop(pid, None)
            if conn is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            try:
                conn.sendall(f"{code if code >= 0 else 128 - code}\n".encode())
            except OSError:
                pass
            conn.close()

    def close(self) -> None:
        self.selector.close()
        self.listener.close()
        if os.path.exists(self.path):
            os.unlink(self.path)


def receive(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """One request: a length-prefixed JSON context plus the launcher's descriptors."""
    conn.settimeout(10)
    header, ancillary, _flags, _addr = conn.recvmsg(4, socket.CMSG_SPACE(FDS_PER_REQUEST * 4))
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(struct.unpack(f"{len(data) // 4}i", data[: len(data) - len(data) % 4]))
    if len(header) != 4 or len(fds) != FDS_PER_REQUEST:
        for fd in fds:
            os.close(fd)
        raise ValueError("expected a length and four descriptors")
    (length,) = struct.unpack("!I", header)
    payload = b""
    while len(payload) < length:
        chunk = conn.recv(length - len(payload))
        if not chunk:
            raise ValueError("request cut short")
        payload += chunk
    conn.settimeout(None)
    return json.loads(payload), fds


@dataclass(frozen=True)
class SettingsAhead:
    """Prefect's root settings context as a flow run with this environment and working folder would
    build it (about 0.1 s of a warm job's start), and what it was built from."""

    key: tuple[Any, ...]
    context: Any  # prefect.context.SettingsContext


def settings_key(env: Mapping[str, str], cwd: str, profiles_path: os.PathLike[str] | str) -> tuple[Any, ...]:
    """Everything Prefect's settings are read from: the PREFECT_* variables, except the ones Prefect
    sets for each run (PREFECT__FLOW_RUN_ID and the like, which no setting reads), HOME, and the state
    of the settings files in ``cwd`` and of the profiles file."""
    upper = {name.upper(): value for name, value in env.items()}
    variables = sorted((name, value) for name, value in upper.items()
                       if name == "HOME" or (name.startswith("PREFECT_") and not name.startswith("PREFECT__")))
    files = [_file_state(os.path.join(cwd, name)) for name in SETTINGS_FILES] + [_file_state(profiles_path)]
    return tuple(variables), tuple(files)


def _file_state(path: os.PathLike[str] | str) -> tuple[int, int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def build_settings_ahead(env: Mapping[str, str], cwd: str) -> SettingsAhead | None:
    """Prefect's root settings context under ``env`` in ``cwd``, built here as a fork builds it
    (this process's environment and folder are put back after); None when that fails."""
    import prefect.context

    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    try:
        os.environ.clear()
        os.environ.update(env)
        os.chdir(cwd)
        context = prefect.context.root_settings_context()
        return SettingsAhead(settings_key(env, cwd, context.settings.profiles_path), context)
    except Exception as exc:  # noqa: BLE001  (the forks then build their own, as without it)
        log.warning("could not build Prefect's settings ahead: %s", exc)
        return None
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)


def settings_for(ahead: SettingsAhead | None, env: Mapping[str, str], cwd: str) -> Any | None:
    """The settings context built ahead, if it was built for this environment and folder."""
    if ahead is None or ahead.key != settings_key(env, cwd, ahead.context.settings.profiles_path):
        return None
    return ahead.context


def run_forked(conn: socket.socket, context: dict[str, Any], fds: list[int], settings: SettingsAhead | None) -> None:
    """In the forked process: become the launcher's flow run, then exit with the engine's status."""
    code = 1
    try:
        conn.close()
        for target, fd in enumerate(fds[:3]):
            os.dup2(fd, target)
            os.close(fd)
        watch_lifeline(fds[3])
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        os.environ.clear()
        os.environ.update(context["env"])
        os.chdir(context["cwd"])
        set_torch_threads()
        code = run_engine(settings)  # sys.stdout/stderr write to fds 1 and 2: the launcher's streams now
    except BaseException:  # noqa: BLE001  (whatever happens, the fork must exit here)
        import traceback

        traceback.print_exc()
    finally:
        try:
            shut_down_like_an_interpreter()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def set_torch_threads() -> None:
    """The torch thread count the runner had before it went single-threaded to load models."""
    if FORK_TORCH_THREADS:
        import torch

        torch.set_num_threads(FORK_TORCH_THREADS)


def shut_down_like_an_interpreter() -> None:
    """What Python does at exit before it tears itself down, so queued work is not lost.

    Prefect ships the run's logs and events from background services that drain in
    ``threading``'s exit hooks; ``os._exit`` alone would drop the last batch (a short run's every
    log line). The fork then skips the interpreter's own teardown, which the runner still needs.
    """
    import atexit
    import threading
    import traceback

    try:
        threading._shutdown()  # type: ignore[attr-defined]  # joins threads, runs _register_atexit hooks
        atexit._run_exitfuncs()
    except BaseException:  # noqa: BLE001
        traceback.print_exc()


def run_engine(settings: SettingsAhead | None = None) -> int:
    """``python -m prefect.engine`` in this (already importing) process, with today's environment and
    Prefect's settings for it (``settings`` when built for it)."""
    import runpy

    import prefect.context

    ahead = settings_for(settings, os.environ, os.getcwd())
    if ahead is not None:
        prefect.context.GLOBAL_SETTINGS_CONTEXT = ahead
    else:
        prefect.context.refresh_global_settings_context()  # dreamflow's own settings are read when used
    os.environ["DREAMFLOW_WARM_START"] = "1"
    os.environ["DREAMFLOW_WARM_SETTINGS"] = "ahead" if ahead is not None else "built"
    sys.argv = ["prefect.engine"]
    sys.modules.pop("prefect.engine", None)  # run its __main__ block afresh
    try:
        runpy.run_module("prefect.engine", run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    return 0


def watch_lifeline(fd: int) -> None:
    """Kill this process when the launcher dies (its end of the pipe closes), as a killed child would."""

    def wait() -> None:
        try:
            while os.read(fd, 1):
                pass
        except OSError:
            pass
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=wait, name="dreamflow-lifeline", daemon=True).start()


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if len(argv) != 2:
        sys.exit("usage: python -m deployments.warm_runner RUNNER_SOCKET")
    seconds = preload()
    runner = Runner(argv[1])

    def stop(_signum: int, _frame: object) -> None:
        runner.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("warm runner ready on %s (imports took %.1f s)", argv[1], seconds)
    runner.serve()


if __name__ == "__main__":
    main(sys.argv)
