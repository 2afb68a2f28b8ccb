"""The flow-run command of a warm worker: ask the warm runner to fork the run, else start it cold.

The process worker starts this script for each flow run instead of ``python -m prefect.engine``.
It uses the standard library only, so it starts in milliseconds. It connects to the warm runner
(deployments/warm_runner.py) over a Unix socket and hands it this process's environment, working
folder, standard streams and the read end of a "lifeline" pipe. The runner forks a copy of itself
(torch, diffusers, Prefect and dreamflow already imported) that runs the flow run with them.

This process stays the flow run's process as far as the worker knows: it forwards SIGTERM and
SIGINT to the forked run (Prefect's cancellation), exits with its exit status, and when it is
killed outright the lifeline closes and the run kills itself, as a killed child would be gone.
When no runner answers, it becomes ``python -m prefect.engine`` (os.execv), a cold start.

    python -S deployments/launch.py /path/to/runner.sock
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys

CONNECT_TIMEOUT_S = 5.0


def cold_start() -> None:
    os.execv(sys.executable, [sys.executable, "-m", "prefect.engine"])


def connect(path: str) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(CONNECT_TIMEOUT_S)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return None
    sock.settimeout(None)
    return sock


def request(sock: socket.socket, lifeline_read: int) -> int:
    """Send the run's context and descriptors; return the forked run's pid."""
    payload = json.dumps({"env": dict(os.environ), "cwd": os.getcwd(), "launcher_pid": os.getpid()}).encode()
    fds = [0, 1, 2, lifeline_read]
    sock.sendmsg([struct.pack("!I", len(payload)), payload],
                 [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))])
    return int(read_line(sock))


def read_line(sock: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(64)
        if not chunk:
            raise ConnectionError("the warm runner closed the connection")
        data += chunk
    return data.decode().strip()


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        sys.exit("usage: launch.py RUNNER_SOCKET")
    sock = connect(argv[1])
    if sock is None:
        cold_start()
    lifeline_read, _lifeline_write = os.pipe()  # the write end stays open only here: closed when we die
    try:
        child = request(sock, lifeline_read)
    except (OSError, ValueError, ConnectionError):
        sock.close()
        cold_start()
    os.close(lifeline_read)

    def forward(signum: int, _frame: object) -> None:
        try:
            os.kill(child, signum)
        except ProcessLookupError:
            pass

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    try:
        status = int(read_line(sock))
    except (OSError, ValueError, ConnectionError):
        status = 1  # the runner itself went away; the run died with it (its lifeline is ours)
    os._exit(status)


if __name__ == "__main__":
    main(sys.argv)
