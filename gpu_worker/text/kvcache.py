"""The batch KV cache of the text engine: one row ("slot") per admitted sequence.

Each sequence writes its keys and values at its own absolute positions, so
sequences of different lengths share one batch without left padding, a newcomer
joins by writing its prefill into a free row (no re-padding or concatenation of
the running batch), and a finished sequence leaves by moving the last row into its
place. Rows ``[0, n_running)`` hold decoding sequences and ``[n_running, n)`` those
still prefilling, so every forward pass reads one contiguous block of rows.

The model sees this object as its cache argument (``cache_kwarg``): transformers' attention layers
call ``update(key, value, layer_idx)`` and attend over what it returns; the 4-D
mask built by the runner hides the columns a row does not own.

``to_layers`` / ``from_layers`` exchange one row's cache as the legacy
per-layer ``(key, value)`` tuple format, the format the session store keeps and
the one ``DynamicCache(ddp_cache_data=...)`` accepts.
"""

from __future__ import annotations

import inspect

import torch


def cache_kwarg(model: torch.nn.Module) -> str:
    """The keyword a model's ``forward`` takes its KV cache by: ``cache`` from
    transformers 5.24 on, ``past_key_values`` before (and, deprecated, still after)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class SlotKVCache:
    is_compileable = False

    def __init__(self, num_layers: int, num_slots: int, kv_heads: int, head_dim: int, *,
                 dtype: torch.dtype, device: torch.device, max_len: int, init_len: int = 256,
                 init_rows: int = 8, budget_bytes: int | None = None):
        self.num_layers = num_layers
        self.num_slots = num_slots
        self.shape_tail = (kv_heads, head_dim)
        self.dtype, self.device = dtype, device
        self.max_len = max_len
        self.init_len = min(init_len, max_len)
        self.init_rows = min(init_rows, num_slots)
        self.bytes_per_token = self.token_bytes(num_layers, kv_heads, head_dim, dtype)
        self.budget_bytes = budget_bytes
        """Most bytes the cache may take; the planner admits only what fits (None = no limit)."""
        self.rows = 0
        self.capacity = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._allocate(self.init_rows, self.init_len)
        # Set by the runner before each forward pass.
        self._rows = slice(0, 0)
        self._row_index: torch.Tensor | None = None
        self._cols: torch.Tensor | None = None
        self._kv_len = 0

    @staticmethod
    def token_bytes(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Keys and values of one token over all layers."""
        return 2 * num_layers * kv_heads * head_dim * torch.finfo(dtype).bits // 8

    # -- memory: grows (by doubling) in rows and in length, only as far as used ----

    @torch.inference_mode()
    def _allocate(self, rows: int, length: int, keep_rows: int = 0, keep_len: int = 0) -> None:
        h, d = self.shape_tail
        new_k, new_v = [], []
        for i in range(self.num_layers):
            # zeros, not empty: masked columns get zero weight, and 0 * NaN garbage would still be NaN
            k = torch.zeros(rows, h, length, d, dtype=self.dtype, device=self.device)
            v = torch.zeros_like(k)
            rows_kept, len_kept = min(keep_rows, self.rows, rows), min(keep_len, self.capacity, length)
            if rows_kept and len_kept:
                k[:rows_kept, :, :len_kept] = self.keys[i][:rows_kept, :, :len_kept]
                v[:rows_kept, :, :len_kept] = self.values[i][:rows_kept, :, :len_kept]
            new_k.append(k)
            new_v.append(v)
        self.keys, self.values = new_k, new_v
        self.rows, self.capacity = rows, length

    def ensure(self, rows: int, length: int, used_rows: int, used_len: int) -> None:
        """Make room for ``rows`` rows of ``length`` columns, keeping what is in use."""
        if length > self.max_len:
            raise ValueError(f"sequence of {length} tokens exceeds the cache limit of {self.max_len}")
        if rows > self.num_slots:
            raise ValueError(f"{rows} rows exceed the {self.num_slots} slots")
        if rows > self.rows or length > self.capacity:
            new_rows = self.rows if rows <= self.rows else min(self.num_slots, max(rows, 2 * self.rows))
            new_len = self.capacity if length <= self.capacity else min(self.max_len, max(length, 2 * self.capacity))
            if not self.fits(new_rows, new_len):  # doubling would overshoot the budget: grow exactly
                new_rows, new_len = max(rows, min(self.rows, new_rows)), max(length, min(self.capacity, new_len))
                if not self.fits(new_rows, new_len):
                    new_rows, new_len = rows, length
            self._allocate(new_rows, new_len, keep_rows=used_rows, keep_len=used_len)

    def fits(self, rows: int, length: int) -> bool:
        return self.budget_bytes is None or rows * length * self.bytes_per_token <= self.budget_bytes

    def shrink(self, used_rows: int, used_len: int) -> None:
        """Give memory back once long sequences or a crowd have left."""
        rows = max(self.init_rows, used_rows)
        length = max(self.init_len, used_len)
        if (rows * 4 <= self.rows and rows < self.rows) or (length * 4 <= self.capacity and length < self.capacity):
            self._allocate(max(rows, min(self.rows, 2 * rows)), max(length, min(self.capacity, 2 * length)),
                           keep_rows=used_rows, keep_len=used_len)

    @staticmethod
    def bytes_for(rows: int, length: int, bytes_per_token: int) -> int:
        return rows * length * bytes_per_token

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    # -- rows -------------------------------------------------------------------

    @torch.inference_mode()
    def move_row(self, src: int, dst: int) -> None:
        if src == dst:
            return
        for t in self.keys + self.values:
            t[dst].copy_(t[src])

    @torch.inference_mode()
    def swap_rows(self, a: int, b: int) -> None:
        if a == b:
            return
        for t in self.keys + self.values:
            tmp = t[a].clone()
            t[a].copy_(t[b])
            t[b].copy_(tmp)

    @torch.inference_mode()
    def to_layers(self, row: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Copy of one row's first ``length`` positions, one (key, value) per layer."""
        return [(k[row, :, :length].clone(), v[row, :, :length].clone()) for k, v in zip(self.keys, self.values)]

    @torch.inference_mode()
    def from_layers(self, row: int, layers: list[tuple[torch.Tensor, torch.Tensor]], length: int) -> None:
        """Write a stored cache into a row's first ``length`` positions."""
        for i, (k, v) in enumerate(layers):
            self.keys[i][row, :, :length].copy_(k[:, :length], non_blocking=True)
            self.values[i][row, :, :length].copy_(v[:, :length], non_blocking=True)

    # -- the forward pass -------------------------------------------------------

    def plan(self, first_row: int, starts: torch.Tensor, query_len: int, kv_len: int) -> None:
        """Rows ``first_row .. first_row+len(starts)`` each write ``query_len`` tokens at
        columns ``start .. start+query_len`` and attend over ``kv_len`` columns."""
        m = starts.shape[0]
        self._rows = slice(first_row, first_row + m)
        self._row_index = torch.arange(m, device=self.device).unsqueeze(1)
        self._cols = starts.unsqueeze(1) + torch.arange(query_len, device=self.device).unsqueeze(0)
        self._kv_len = kv_len

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        k = self.keys[layer_idx][self._rows]
        v = self.values[layer_idx][self._rows]
        k[self._row_index, :, self._cols] = key_states.transpose(1, 2).to(k.dtype)
        v[self._row_index, :, self._cols] = value_states.transpose(1, 2).to(v.dtype)
        return k[:, :, : self._kv_len], v[:, :, : self._kv_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_len


# -- interchange with transformers' cache formats ---------------------------------

Layers = list[tuple[torch.Tensor, torch.Tensor]]
"""The legacy per-layer ``(key, value)`` format, one sequence: ``[kv_heads, tokens, head_dim]``."""


def layers_to_dynamic_cache(layers: Layers, config) -> "DynamicCache":  # noqa: F821
    """One sequence's cache as a transformers ``DynamicCache`` (batch of one)."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=[(k.unsqueeze(0), v.unsqueeze(0)) for k, v in layers], config=config)


def dynamic_cache_to_layers(cache, row: int = 0) -> Layers:
    """One row of a ``DynamicCache`` (or of a legacy tuple of ``(key, value)``) as layers."""
    if isinstance(cache, (tuple, list)):
        return [(k[row], v[row]) for k, v in cache]
    return [(layer.keys[row], layer.values[row]) for layer in cache.layers]
