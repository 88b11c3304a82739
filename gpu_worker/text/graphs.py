"""Decode steps replayed from CUDA graphs, one graph per padded batch size.

A decode step's work is the same few hundred kernel launches every time; on a GPU
with a small model, launching them costs more than running them. So for each batch
size in ``sizes`` the whole forward pass (embedding to logits, the paged attention
kernel included) is captured once into a CUDA graph over static input buffers, and
a decode step of ``b`` sequences fills the buffers of the smallest size ``>= b`` and
replays it. Padding rows write their keys into the null block and read one key from
it; their logits are ignored.

Only the ``paged`` attention backend qualifies: its kernel reads the pool through
the block table, so every shape in the step is fixed by the batch size alone (the
kernel's ``max_k`` is the context length). The inputs travel in one copy from a
pinned host staging buffer. Capture happens at load; if it fails (an operation in
the model that cannot be captured), the runner logs why and runs eagerly.

``capture=False`` keeps every buffer and the padding but calls the forward pass
instead of replaying it: how CPU tests check this bookkeeping.
"""

from __future__ import annotations

import logging

import torch

from gpu_worker.text.attention import Step

log = logging.getLogger(__name__)


def default_sizes(max_batch: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256) if s < max_batch]
    return sizes + [max_batch]


class DecodeGraphs:
    def __init__(self, runner, sizes: list[int], *, capture: bool = True):
        self.runner = runner
        self.cache = cache = runner.cache
        self.sizes = sorted(set(sizes))
        self.capture = capture
        n = self.sizes[-1]
        dev = cache.device
        # ids, positions, slot mapping, used lengths, slots: one row each, one host-to-device
        # copy. Reusing the pinned buffer each step is safe: the step's sampler reads its
        # tokens back (a sync) before the next step writes here.
        self.staging = torch.zeros(5, n, dtype=torch.long, pin_memory=dev.type == "cuda")
        self.inputs = torch.zeros(5, n, dtype=torch.long, device=dev)
        self.used = torch.ones(n, dtype=torch.int32, device=dev)
        self.cu_q = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.cu_k = torch.zeros(n + 1, dtype=torch.int32, device=dev)
        self.table = torch.zeros(n, cache.max_blocks_per_seq, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}

    def fits(self, batch: int) -> bool:
        return batch <= self.sizes[-1]

    def _forward(self, b: int) -> torch.Tensor:
        ids, positions, slot_mapping = self.inputs[0, :b], self.inputs[1, :b], self.inputs[2, :b]
        used = self.used[:b]
        used.copy_(self.inputs[3, :b])
        torch.cumsum(used, 0, out=self.cu_k[1: b + 1])
        step = Step(self.cache, self.runner.backend, positions, slot_mapping, [1] * b, [],
                    {"cu_q": self.cu_q[: b + 1], "cu_k": self.cu_k[: b + 1], "max_q": 1,
                     "max_k": self.cache.max_len, "used": used, "table": self.table[:b]})
        return self.runner.run_model(ids, positions, step, None)

    @torch.inference_mode()
    def capture_all(self) -> None:
        """Capture every size, largest first (the smaller ones reuse its memory pool)."""
        if not self.capture:
            return
        pool = None
        stream = torch.cuda.Stream(self.cache.device)
        stream.wait_stream(torch.cuda.current_stream(self.cache.device))
        with torch.cuda.stream(stream):
            for b in reversed(self.sizes):
                self._pad(0, b)
                for _ in range(2):  # warm-up: lazy initialisation must not happen inside the capture
                    self._forward(b)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self.logits[b] = self._forward(b)
                pool = graph.pool()
                self.graphs[b] = graph
        torch.cuda.current_stream(self.cache.device).wait_stream(stream)
        torch.cuda.synchronize(self.cache.device)

    def _pad(self, b: int, size: int) -> None:
        """Rows ``b..size``: token 0 at position 0, written to and read from the null block."""
        self.staging[:, b:size] = 0
        self.staging[3, b:size] = 1
        self.table[b:size] = 0

    @torch.inference_mode()
    def run(self, slots: list[int], tokens: list[int], starts: list[int]) -> torch.Tensor:
        """Logits of one decode step (``tokens[j]`` at position ``starts[j]`` of ``slots[j]``)."""
        b = len(slots)
        size = next(s for s in self.sizes if s >= b)
        cache, bs = self.cache, self.cache.block_size
        host = cache.table_host
        self.staging[0, :b] = torch.tensor(tokens)
        self.staging[1, :b] = torch.tensor(starts)
        self.staging[2, :b] = torch.tensor([int(host[s, p // bs]) * bs + p % bs for s, p in zip(slots, starts)])
        self.staging[3, :b] = self.staging[1, :b] + 1
        self.staging[4, :b] = torch.tensor(slots)
        self._pad(b, size)
        self.inputs[:, :size].copy_(self.staging[:, :size], non_blocking=True)
        self.table[:b] = cache.sync_table().index_select(0, self.inputs[4, :b])
        if self.capture:
            self.graphs[size].replay()
            return self.logits[size][:b]
        return self._forward(size)[:b]
