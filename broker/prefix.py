"""Chained hashes of a prompt's token blocks, computed the same way by the API (to
route a request to a worker that holds its prefix) and by the workers (to find and
store reusable KV caches).

``prefix_hashes(ids, scope)[j]`` identifies the first ``(j + 1) * BLOCK`` tokens
within one cache scope (blake2b, 64-bit digests, chained so each depends on
everything before it). The chain starts from a digest of the scope (by default the
user), so two tenants' identical prompts hash apart: neither can find, route to or
learn of the other's prefix. Workers still compare token ids before reusing a cache:
a hash only says where to look."""

from __future__ import annotations

import hashlib
from array import array

BLOCK = 64
"""Tokens per block: prefixes are reused in whole blocks."""

MAX_BLOCKS = 64
"""Hashes cover at most this many blocks (4096 tokens); longer prompts reuse that much."""


def prefix_hashes(token_ids: list[int], scope: str = "", block: int = BLOCK,
                  max_blocks: int = MAX_BLOCKS) -> list[str]:
    out = []
    h = hashlib.blake2b(scope.encode(), digest_size=8, person=b"inferstack-scope").digest()
    for j in range(min(len(token_ids) // block, max_blocks)):
        chunk = array("q", token_ids[j * block:(j + 1) * block]).tobytes()
        h = hashlib.blake2b(h + chunk, digest_size=8).digest()
        out.append(h.hex())
    return out
