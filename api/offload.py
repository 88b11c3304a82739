"""A bounded thread pool for the CPU work a request body brings (JSON parsing and
validation, chat templating, tokenizing), so that the event loop only moves bytes:
one client's megabytes never delay another client's tokens or ``/health``. The
tokenizers release the GIL while they run; templating and validation are Python and
share it with the loop in the interpreter's 5 ms slices."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class Offload:
    def __init__(self, threads: int):
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="offload")

    async def __call__(self, fn: Callable[..., T], *args) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
