"""A real ``redis-server`` on a free port, for tests and for the local stack."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import redis

_PR_SET_PDEATHSIG = 1


def _own_group_dying_with_parent() -> None:
    """preexec_fn for a child the launcher owns: a process group of its own, so that a
    terminal's Ctrl-C reaches only the launcher, which then stops the children in order
    (clients before Redis); and SIGTERM when the launcher dies, so none is orphaned."""
    os.setpgid(0, 0)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn_owned(args: list[str], **kwargs) -> subprocess.Popen:
    """Start a child that only its parent stops (see ``_own_group_dying_with_parent``)."""
    return subprocess.Popen(args, preexec_fn=_own_group_dying_with_parent, **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self, port: int | None = None):
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found: `make test` installs it (apt-get install redis-server)")
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="inferstack-redis-")
        self.proc = spawn_owned(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.dir, "--loglevel", "warning"],
            stdout=subprocess.DEVNULL,
        )
        self.url = f"redis://127.0.0.1:{self.port}/0"
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("redis-server did not start")
                time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
