"""A real ``redis-server`` on a free port, for tests and for the local stack."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time

import redis

from inferstack.procs import spawn_owned


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """``appendonly``: persist every write to an append-only file, synced every second
    (``--appendfsync everysec``), so that a restarted server comes back with its data:
    all of it after a clean shutdown, all but about the last second after a crash."""

    def __init__(self, port: int | None = None, *, appendonly: bool = False):
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise RuntimeError("redis-server not found: `make test` installs it (apt-get install redis-server)")
        self.port = port or free_port()
        self.appendonly = appendonly
        self.dir = tempfile.mkdtemp(prefix="inferstack-redis-")
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        """Start (again) on the same port and directory: an append-only file there is loaded."""
        persistence = ["--appendonly", "yes", "--appendfsync", "everysec"] if self.appendonly else ["--appendonly", "no"]
        self.proc = spawn_owned(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *persistence,
             "--dir", self.dir, "--loglevel", "warning"],
            stdout=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:  # refused while starting, BusyLoadingError while loading the AOF
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("redis-server did not start")
                time.sleep(0.05)
        client.close()

    def shutdown(self) -> None:
        """Stop the server cleanly (SIGTERM: it syncs its append-only file first)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        """Crash it (SIGKILL): with ``appendonly``, up to about a second of writes is lost."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self, down_s: float = 0.0) -> None:
        self.shutdown()
        time.sleep(down_s)
        self.start()

    def stop(self) -> None:
        self.shutdown()
        shutil.rmtree(self.dir, ignore_errors=True)
