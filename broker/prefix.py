"""Chained hashes of a prompt's token blocks, computed the same way by the API (to
route a request to a worker that holds its prefix) and by the workers (to find and
store reusable KV caches).

``prefix_hashes(ids)[j]`` identifies the first ``(j + 1) * BLOCK`` tokens: equal hashes
mean equal token prefixes (blake2b, 64-bit digests, chained so each depends on
everything before it)."""

from __future__ import annotations

import hashlib
from array import array

BLOCK = 64
"""Tokens per block: prefixes are reused in whole blocks."""

MAX_BLOCKS = 64
"""Hashes cover at most this many blocks (4096 tokens); longer prompts reuse that much."""


def prefix_hashes(token_ids: list[int], block: int = BLOCK, max_blocks: int = MAX_BLOCKS) -> list[str]:
    out = []
    h = b""
    for j in range(min(len(token_ids) // block, max_blocks)):
        chunk = array("q", token_ids[j * block:(j + 1) * block]).tobytes()
        h = hashlib.blake2b(h + chunk, digest_size=8).digest()
        out.append(h.hex())
    return out
