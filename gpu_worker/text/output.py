"""Token ids -> text the client sees: incremental detokenization (so multi-byte
characters and leading spaces come out right mid-stream), stop strings that may span
tokens (the stop text itself is never emitted), and the ``<think>`` split of
reasoning models."""

from __future__ import annotations

from tokenizers.decoders import DecodeStream

from inferstack.text import THINK_CLOSE, THINK_OPEN, partial_suffix


class ReasoningSplitter:
    """Routes streamed text to ``reasoning`` while inside ``<think>...</think>``."""

    def __init__(self, starts_inside: bool = False):
        self.state = "inside" if starts_inside else "start"
        self.buf = ""

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        self.buf += text
        content, reasoning = "", ""
        while self.buf:
            if self.state == "start":
                stripped = self.buf.lstrip()
                if stripped.startswith(THINK_OPEN):
                    self.buf = stripped[len(THINK_OPEN):]
                    self.state = "inside"
                elif THINK_OPEN.startswith(stripped) and not final:
                    break  # could still become "<think>"
                else:
                    self.state = "content"
            elif self.state == "inside":
                idx = self.buf.find(THINK_CLOSE)
                if idx >= 0:
                    reasoning += self.buf[:idx]
                    self.buf = self.buf[idx + len(THINK_CLOSE):]
                    self.state = "after"
                else:
                    keep = 0 if final else partial_suffix(self.buf, THINK_CLOSE)
                    reasoning += self.buf[: len(self.buf) - keep]
                    self.buf = self.buf[len(self.buf) - keep:]
                    break
            elif self.state == "after":  # the blank lines between </think> and the answer
                self.buf = self.buf.lstrip("\n")
                if self.buf:
                    self.state = "content"
            else:
                content += self.buf
                self.buf = ""
        return content, reasoning


class OutputProcessor:
    """Per-sequence text state. ``push(token_id)`` returns (content, reasoning, stopped)."""

    def __init__(self, tokenizer, stop: tuple[str, ...], skip_special_tokens: bool, context_ids: list[int],
                 reasoning: bool = False, reasoning_open: bool = False):
        self._tok = tokenizer
        # A little prompt context makes the first token decode with its real leading space.
        self._stream = DecodeStream(ids=list(context_ids[-4:]), skip_special_tokens=skip_special_tokens)
        self._stop = tuple(s for s in stop if s)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._pending = ""
        self._reasoning = ReasoningSplitter(reasoning_open) if reasoning else None

    def push(self, token_id: int) -> tuple[str, str, bool]:
        piece = self._stream.step(self._tok, token_id) or ""
        return self._route(piece, final=False)

    def flush(self) -> tuple[str, str]:
        """Finish: release held-back text (no stop string can complete any more)."""
        content, reasoning, _ = self._route("", final=True)
        return content, reasoning

    def _route(self, piece: str, final: bool) -> tuple[str, str, bool]:
        text, stopped = self._apply_stop(piece, final)
        if self._reasoning is None:
            return text, "", stopped
        content, reasoning = self._reasoning.feed(text, final=final or stopped)
        return content, reasoning, stopped

    def _apply_stop(self, piece: str, final: bool) -> tuple[str, bool]:
        if not self._stop:
            return piece, False
        self._pending += piece
        cut = min((i for i in (self._pending.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            out, self._pending = self._pending[:cut], ""
            return out, True
        if final:
            out, self._pending = self._pending, ""
            return out, False
        keep = min(self._hold, len(self._pending))
        out = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(self._pending) - keep:]
        return out, False
