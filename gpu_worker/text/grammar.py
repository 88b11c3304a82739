"""Constrained decoding with xgrammar: compile each request's grammar off the step
loop, keep one matcher per sequence, and mask the logits of constrained rows only.

* :class:`GrammarCache` (one per engine, so per model and tokenizer) compiles on its
  own thread and keeps compiled grammars by constraint, so a repeated schema costs
  nothing. The engine holds a request back until its grammar is ready; the batch
  never waits for a compile.
* Each sequence (each of ``n`` choices) gets its own ``GrammarMatcher``; a resumed
  request replays the tokens it already generated into a fresh one.
* :func:`constrain` fills one bitmask row per constrained sequence, sized to the
  logits' width (a model's vocab_size may exceed its tokenizer's, as Qwen's does), and
  applies it to those rows only. A row the grammar leaves no token for ends up all
  ``-inf``, which the sampler reports as that row's failure (``CONSTRAINT_FAILED``), so
  the engine fails that request alone.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from broker.messages import Constraint
from inferstack.structured import build_grammar

log = logging.getLogger(__name__)

CACHE_ENTRIES = 512
"""Compiled grammars kept per model (least recently used go first)."""

COMPILE_THREADS = 2
"""Threads xgrammar may use to compile one grammar (the compile thread is one more)."""

class GrammarCache:
    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int], name: str = "",
                 max_entries: int = CACHE_ENTRIES):
        self.vocab_size = vocab_size
        """Width of the logits (the model's vocab_size), which is the width of every mask."""
        self._max_entries = max_entries
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"grammar-{name}")
        self._compiler = None
        self._entries: OrderedDict[tuple, Future] = OrderedDict()
        self._lock = threading.Lock()
        self.compiles = 0
        # Built with the engine (~0.5 s for a 50k vocabulary, mostly Python holding the
        # GIL), not on the first constrained request, where it would slow the step loop.
        # A host without xgrammar (or its pydantic) still serves free-form requests; a
        # constrained one fails alone, saying why.
        try:
            import xgrammar as xgr
        except ImportError as exc:
            self.missing = f"structured outputs need xgrammar on the worker ({exc})"
            log.warning("%s: %s; constrained requests will fail", name, self.missing)
            return
        self.missing = ""
        started = time.perf_counter()
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=sorted(stop_token_ids))
        self._compiler = xgr.GrammarCompiler(info, max_threads=COMPILE_THREADS, cache_enabled=False)
        log.info("%s: grammar compiler ready in %.2f s", name, time.perf_counter() - started)

    def get(self, constraint: Constraint, reasoning: bool = False) -> Future:
        """The compiled grammar, as a future (already done when cached)."""
        key = (constraint.kind, constraint.spec, constraint.strict, reasoning)
        with self._lock:
            fut = self._entries.get(key)
            # A failed compile is not kept: the next request compiles (and reports) afresh.
            if fut is not None and not (fut.done() and fut.exception() is not None):
                self._entries.move_to_end(key)
                return fut
            fut = self._pool.submit(self._compile, constraint, reasoning)
            self._entries[key] = fut
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)
        return fut

    def _compile(self, constraint: Constraint, reasoning: bool):
        if self._compiler is None:
            raise RuntimeError(self.missing)
        self.compiles += 1
        return self._compiler.compile_grammar(build_grammar(constraint, reasoning))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def new_matcher(compiled, replay: list[int]):
    """A fresh matcher that has accepted ``replay`` (a resumed sequence's tokens); None
    if the grammar rejects one of them."""
    import xgrammar as xgr

    matcher = xgr.GrammarMatcher(compiled)
    for tok in replay:
        if not matcher.accept_token(tok):
            return None
    return matcher


def _backend(device: torch.device) -> str:
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        return "triton"
    return "torch_native"


def constrain(logits: torch.Tensor, seqs: list) -> None:
    """Mask, in place, the rows of ``logits`` whose sequence has a grammar to the tokens
    it allows next (-inf elsewhere; a row it allows nothing is left all -inf); other
    rows are untouched."""
    import xgrammar as xgr

    rows = [i for i, s in enumerate(seqs) if s.grammar is not None and not s.grammar.is_terminated()]
    if not rows:
        return
    bitmask = xgr.allocate_token_bitmask(len(seqs), logits.shape[-1])  # all allowed
    for i in rows:
        seqs[i].grammar.fill_next_token_bitmask(bitmask, i)
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True),
                                    vocab_size=logits.shape[-1], indices=rows, backend=_backend(logits.device))
