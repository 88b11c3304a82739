"""One choice of one request, from admission to retirement."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

from broker.messages import GenerateRequest, SamplingParams


class SeqStatus(IntEnum):
    """Ordered: everything at or above FINISHED_STOPPED is finished."""

    WAITING = 0
    PREFILLING = 1
    RUNNING = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5

    @property
    def finished(self) -> bool:
        return self >= SeqStatus.FINISHED_STOPPED


FINISH_REASON = {
    SeqStatus.FINISHED_STOPPED: "stop",
    SeqStatus.FINISHED_LENGTH: "length",
    SeqStatus.FINISHED_ABORTED: "abort",
}


@dataclass(eq=False)
class Sequence:
    request: GenerateRequest
    choice: int
    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    slot: int = -1
    """Its slot (block table row) in the paged KV cache while admitted, -1 otherwise."""
    num_computed: int = 0
    """Tokens (prompt, then output) whose K/V are in the cache."""
    num_cached: int = 0
    """Prompt tokens whose K/V came from a reused cache rather than prefill."""
    emitted_tokens: int = 0
    """Output tokens already published (events carry token_ids[emitted_tokens:])."""
    output: object = None
    """OutputProcessor (detokenizer, stop strings, reasoning split)."""
    logprobs: list = field(default_factory=list)
    """Logprob records of tokens not yet published."""
    restore: tuple | None = None
    """(KvEntry, tokens) to copy into the row when admitted: a reused KV cache."""
    pending_text: str = ""
    pending_reasoning: str = ""
    """Text produced since the last published event."""
    grammar: object = None
    """xgrammar matcher of a constrained sequence (``gpu_worker.text.grammar``), else None."""

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def request_id(self) -> str:
        return self.request.id

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_slice(self, start: int, n: int) -> list[int]:
        """Tokens ``start .. start+n`` of prompt plus output (without joining the two)."""
        p = len(self.prompt_ids)
        if start + n <= p:
            return self.prompt_ids[start: start + n]
        if start >= p:
            return self.output_ids[start - p: start - p + n]
        return self.prompt_ids[start:] + self.output_ids[: start + n - p]

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def max_length(self) -> int:
        """Prompt plus every token it may generate (the API keeps this within the context)."""
        return len(self.prompt_ids) + self.params.max_tokens

    @property
    def pending_prefill(self) -> int:
        """Tokens still to run through the model before the next token can be sampled."""
        return self.length - self.num_computed

    @property
    def finish_reason(self) -> str | None:
        return FINISH_REASON.get(self.status)
