"""inferstack up's supervision: a dead child is restarted with backoff while the
others keep running; one that keeps dying makes it give up with a clear message.
Real child processes, a fake clock."""

import subprocess
import sys
from collections import deque

import pytest

from inferstack.supervisor import GiveUp, RestartPolicy, Supervisor


def test_backoff_doubles_to_the_cap_and_forgets_old_deaths():
    policy = RestartPolicy(base_s=1, cap_s=5, max_crashes=5, window_s=100)
    crashes: deque[float] = deque()
    delays = []
    for t in (0, 1, 2, 3):
        crashes.append(t)
        delays.append(policy.delay(crashes, t))
    assert delays == [1, 2, 4, 5]
    crashes.append(4)
    assert policy.delay(crashes, 4) is None  # the fifth death within the window
    later: deque[float] = deque([0, 1, 2, 3, 500])
    assert policy.delay(later, 500) == 1  # ran well for a while: starts over


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def python(code: str):
    return lambda: subprocess.Popen([sys.executable, "-c", code])


def test_a_dead_child_restarts_after_its_backoff_and_the_others_keep_running():
    clock, said = Clock(), []
    sup = Supervisor(RestartPolicy(base_s=2, cap_s=30, max_crashes=3, window_s=60), say=said.append, clock=clock)
    steady = sup.add("api", python("import time; time.sleep(60)"))
    sup.add("worker", python("import sys; sys.exit(3)"))
    try:
        sup.children["worker"].proc.wait(10)
        sup.check()
        assert said == ["worker exited with code 3; restarting it in 2 s, the rest keep running"]
        assert sup.children["worker"].proc is None
        clock.t = 1.0
        sup.check()
        assert sup.children["worker"].proc is None  # still backing off
        clock.t = 2.0
        sup.check()
        assert sup.children["worker"].restarts == 1 and said[-1].startswith("worker restarted")
        sup.children["worker"].proc.wait(10)
        clock.t = 3.0
        sup.check()
        assert said[-1] == "worker exited with code 3; restarting it in 4 s, the rest keep running"
        assert steady.poll() is None and sup.children["api"].restarts == 0
        clock.t = 7.0
        sup.check()
        sup.children["worker"].proc.wait(10)
        with pytest.raises(GiveUp, match=r"worker died 3 times within 60 s \(last exit code 3\); giving up"):
            sup.check()
    finally:
        sup.stop(["api", "worker"], timeout_s=5)
    assert steady.poll() is not None
