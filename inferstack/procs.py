"""Child processes the launcher owns (``inferstack up``'s Redis, API, worker, exporter)."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

_PR_SET_PDEATHSIG = 1


def _own_group_dying_with_parent() -> None:
    os.setpgid(0, 0)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn_owned(args: list[str], **kwargs) -> subprocess.Popen:
    """Start a child in a process group of its own, so that a terminal's Ctrl-C reaches
    only its parent, which then stops the children in order (clients before Redis); on
    Linux the child also gets SIGTERM when the parent dies, so none is orphaned. That
    signal follows the *thread* that started the child: start owned children from a
    thread that lives as long as they should (the main one)."""
    return subprocess.Popen(args, preexec_fn=_own_group_dying_with_parent, **kwargs)
