"""Keeps ``inferstack up``'s children running: a child that dies is started again
after a backoff while the others keep running (clients of the API ride out a
worker's restart; a restarted API is resumable from Redis); a child that keeps dying
makes the supervisor give up with a message saying which one and what to do."""

from __future__ import annotations

import subprocess
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RestartPolicy:
    base_s: float = 1.0
    cap_s: float = 30.0
    max_crashes: int = 5
    window_s: float = 120.0

    def delay(self, crashes: deque[float], now: float) -> float | None:
        """Given the times a child died (this death last), how long to wait before
        starting it again, or None to give up. Deaths older than the window are
        forgotten, so a child that ran well for a while starts over at ``base_s``."""
        while crashes and now - crashes[0] > self.window_s:
            crashes.popleft()
        if len(crashes) >= self.max_crashes:
            return None
        return min(self.cap_s, self.base_s * 2 ** (len(crashes) - 1))


@dataclass
class Child:
    name: str
    start: Callable[[], subprocess.Popen]
    proc: subprocess.Popen | None = None
    restart_at: float | None = None
    crashes: deque[float] = field(default_factory=deque)
    restarts: int = 0


class GiveUp(Exception):
    """A child died too often; the message says which and what to do."""


class Supervisor:
    def __init__(self, policy: RestartPolicy | None = None, say: Callable[[str], None] = print,
                 clock: Callable[[], float] = time.monotonic):
        self.policy = policy or RestartPolicy()
        self.say = say
        self.clock = clock
        self.children: dict[str, Child] = {}

    def add(self, name: str, start: Callable[[], subprocess.Popen]) -> subprocess.Popen:
        child = Child(name, start)
        child.proc = start()
        self.children[name] = child
        return child.proc

    def check(self) -> None:
        """Restart the dead (after their backoff); raises :class:`GiveUp`."""
        now = self.clock()
        for c in self.children.values():
            if c.proc is None:
                if now >= c.restart_at:
                    c.proc = c.start()
                    c.restarts += 1
                    self.say(f"{c.name} restarted (pid {c.proc.pid})")
                continue
            code = c.proc.poll()
            if code is None:
                continue
            c.crashes.append(now)
            delay = self.policy.delay(c.crashes, now)
            if delay is None:
                raise GiveUp(
                    f"{c.name} died {self.policy.max_crashes} times within {self.policy.window_s:.0f} s (last exit "
                    f"code {code}); giving up. Its output is above; run `inferstack {c.name}` on its own to see the "
                    "error.")
            self.say(f"{c.name} exited with code {code}; restarting it in {delay:.0f} s, the rest keep running")
            c.proc, c.restart_at = None, now + delay

    def stop(self, order: list[str], timeout_s: float = 15.0, stop: dict | None = None) -> None:
        """Stop the children in ``order`` (SIGTERM, then SIGKILL after ``timeout_s``);
        ``stop`` maps names to their own stop functions (the private Redis)."""
        stop = stop or {}
        for name in order:
            c = self.children.get(name)
            if c is None or c.proc is None or c.proc.poll() is not None or name in stop:
                continue
            c.proc.terminate()
        for name in order:
            c = self.children.get(name)
            if c is None or c.proc is None:
                continue
            if name in stop:
                stop[name]()
                continue
            try:
                c.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                c.proc.kill()
