"""Text markers and helpers shared by the API and the workers."""

from __future__ import annotations

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
"""Reasoning models' reasoning section."""


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``:
    what a stream must hold back because it may still become ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
