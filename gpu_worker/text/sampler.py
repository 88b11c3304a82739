"""Logits -> next tokens, with per-request parameters inside one batch.

Order of operations (as in vLLM): raw logprobs for reporting; penalties
(repetition, frequency, presence); logit_bias; min_tokens; the grammar mask of
constrained rows (``gpu_worker.text.grammar``); then greedy rows take the argmax and
sampling rows apply temperature, top-k, top-p and min-p and draw. A request with a
seed draws from a generator seeded by (seed, choice, position), so it is
reproducible inside any batch and after a resume on another worker.

One row's trouble stays in its row: a row whose logits are not finite, or whose
penalties, bans or grammar leave no token to draw (NaN, +inf, or everything -inf), is
reported as failed (one vectorised check, read back with the tokens) and sampled as
uniform noise that nobody sees, so the rest of the batch goes on untouched.
"""

from __future__ import annotations

import functools
import logging

import torch

from broker.messages import ErrorEvent
from gpu_worker.text.grammar import constrain
from gpu_worker.text.sequence import Sequence

log = logging.getLogger(__name__)

PARAMS_FAILED, NUMERIC_FAILED, CONSTRAINT_FAILED = 1, 2, 3
"""Failure codes of a row: its parameters broke it (its raw logits were fine), the
model's own logits were not finite, or its grammar allowed no token (that was left)."""


def sampling_error(request_id: str, code: int) -> ErrorEvent:
    """The OpenAI-shaped error a failed row's request gets."""
    if code == PARAMS_FAILED:
        return ErrorEvent(request_id, "The sampling parameters left no token to sample (the probabilities became "
                          "NaN or infinite, or every token was excluded): check repetition_penalty, "
                          "stop_token_ids with min_tokens, and the other penalties.",
                          type="invalid_request_error", code="invalid_sampling_parameters", status=400)
    if code == CONSTRAINT_FAILED:
        return ErrorEvent(request_id, "The output constraint allows no next token here (is the schema or "
                          "pattern satisfiable, and not excluded by logit_bias or the penalties?).",
                          type="invalid_request_error", code="constraint_unsatisfiable", status=400)
    return ErrorEvent(request_id, "The model produced non-finite logits for this request.", type="server_error",
                      code="numeric_error", status=500)

_SEED_MIX = 0x9E3779B97F4A7C15


def position_seed(seed: int, choice: int, position: int) -> int:
    return (seed * 1_000_003 + choice * 7_919 + position * _SEED_MIX) % (2**63 - 1)


class Sampler:
    def __init__(self, eos_token_ids: set[int], token_text):
        self.eos = sorted(eos_token_ids)
        self._token_text = functools.lru_cache(maxsize=1 << 16)(token_text)
        """Callable id -> str, used only for logprob records (memoised: a vocabulary is finite)."""

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[dict | None], list[int]]:
        """Next token, logprob record (or None) and failure code (0 = fine) per row."""
        logits = logits.float()
        want_logprobs = [s.params.logprobs for s in seqs]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None
        raw_bad = _broken(logits)

        constrained = any(s.grammar is not None for s in seqs)
        if constrained or any(_has_penalty(s) for s in seqs) or any(_blocks_stop(s) for s in seqs):
            logits = logits.clone()  # edited in place below; the model's logits stay as they came
            for row, seq in enumerate(seqs):
                try:
                    if _has_penalty(seq):
                        _apply_penalties(logits[row], seq)
                    if _blocks_stop(seq):
                        banned = list(self.eos) + list(seq.params.stop_token_ids)
                        logits[row, banned] = float("-inf")
                except (IndexError, RuntimeError, ValueError):  # e.g. a token id beyond this model's vocabulary
                    log.warning("sampling parameters of %s broke its row", seq.request_id, exc_info=True)
                    logits[row] = float("nan")
            bad = _broken(logits)
        else:
            bad = raw_bad.clone()
        grammar_bad = None
        if constrained:
            constrain(logits, seqs)  # each constrained row to its grammar's tokens
            # A row its grammar empties (all -inf) fails like any other, with its own reason.
            grammar_bad = _broken(logits) & ~bad
            bad |= grammar_bad
        logits = logits.masked_fill(bad.unsqueeze(1), 0.0)  # failed rows draw harmless noise

        greedy = [s.params.greedy for s in seqs]
        tokens = torch.empty(len(seqs), dtype=torch.long, device=logits.device)
        if all(greedy):
            tokens = logits.argmax(dim=-1)
        else:
            g_rows = [i for i, g in enumerate(greedy) if g]
            s_rows = [i for i, g in enumerate(greedy) if not g]
            if g_rows:
                tokens[g_rows] = logits[g_rows].argmax(dim=-1)
            tokens[s_rows], bad_probs = self._sample(logits[s_rows], [seqs[i] for i in s_rows])
            bad[s_rows] |= bad_probs
        failed = bad.long() * PARAMS_FAILED
        if grammar_bad is not None:
            failed = torch.where(grammar_bad, CONSTRAINT_FAILED, failed)
        failed = torch.where(raw_bad, NUMERIC_FAILED, failed)

        return self._read_back(tokens, failed, raw_logprobs, seqs)

    def _read_back(self, tokens: torch.Tensor, failed: torch.Tensor, raw_logprobs: torch.Tensor | None,
                   seqs: list[Sequence]) -> tuple[list[int], list[dict | None], list[int]]:
        """Tokens, failure codes and the logprobs asked for, in the step's one read-back
        from the device (packed as float64, exact for token ids)."""
        n = len(seqs)
        rows = [i for i, s in enumerate(seqs) if s.params.logprobs] if raw_logprobs is not None else []
        top_n = max((seqs[i].params.top_logprobs for i in rows), default=0)
        packed = [tokens.double(), failed.double()]
        if rows:
            idx = torch.tensor(rows, device=tokens.device)
            lp = raw_logprobs.index_select(0, idx)
            packed.append(lp.gather(1, tokens.index_select(0, idx).unsqueeze(1)).squeeze(1).double())
            if top_n:
                values, ids = lp.topk(top_n, dim=-1)
                packed += [values.flatten().double(), ids.flatten().double()]
        flat = torch.cat(packed).tolist()
        token_list = [int(t) for t in flat[:n]]
        failures = [int(f) for f in flat[n: 2 * n]]
        records: list[dict | None] = [None] * n
        r = len(rows)
        chosen = flat[2 * n: 2 * n + r]
        top_v = flat[2 * n + r: 2 * n + r + r * top_n]
        top_i = flat[2 * n + r + r * top_n:]
        for j, row in enumerate(rows):
            if failures[row]:
                continue
            want = seqs[row].params.top_logprobs
            tops = zip(top_i[j * top_n: j * top_n + want], top_v[j * top_n: j * top_n + want])
            records[row] = {"token": self._token_text(token_list[row]), "id": token_list[row], "logprob": chosen[j],
                            "top_logprobs": [{"token": self._token_text(int(i)), "id": int(i), "logprob": v}
                                             for i, v in tops]}
        return token_list, records, failures

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
        """Draws, and which rows had no valid distribution left."""
        temps = torch.tensor([s.params.temperature for s in seqs], dtype=logits.dtype, device=logits.device).unsqueeze(1)
        logits = logits / temps
        top_k = [s.params.top_k for s in seqs]
        top_p = [s.params.top_p for s in seqs]
        if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
            logits = _top_k_top_p(logits, top_k, top_p)
        min_p = [s.params.min_p for s in seqs]
        if any(m > 0 for m in min_p):
            probs = torch.softmax(logits, dim=-1)
            threshold = torch.tensor(min_p, dtype=probs.dtype, device=probs.device).unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
            logits = logits.masked_fill(probs < threshold, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        bad = _broken(probs)
        probs = probs.masked_fill(bad.unsqueeze(1), 1.0)

        out = torch.empty(len(seqs), dtype=torch.long, device=probs.device)
        unseeded = [i for i, s in enumerate(seqs) if s.params.seed is None]
        if unseeded:
            out[unseeded] = torch.multinomial(probs[unseeded], 1).squeeze(1)
        for i, seq in enumerate(seqs):
            if seq.params.seed is not None:
                gen = torch.Generator(device=probs.device)
                gen.manual_seed(position_seed(seq.params.seed, seq.choice, len(seq.output_ids)))
                out[i] = torch.multinomial(probs[i], 1, generator=gen)[0]
        return out, bad


def _broken(x: torch.Tensor) -> torch.Tensor:
    """Rows with a NaN or +inf, or nothing above -inf: one reduction (max propagates NaN)."""
    return ~torch.isfinite(x.amax(dim=-1))


def _has_penalty(seq: Sequence) -> bool:
    p = seq.params
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 or bool(p.logit_bias)


def _blocks_stop(seq: Sequence) -> bool:
    # Under a grammar, the grammar decides where the output ends (min_tokens is not applied).
    return len(seq.output_ids) < seq.params.min_tokens and seq.grammar is None


def _apply_penalties(row: torch.Tensor, seq: Sequence) -> None:
    p = seq.params
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(seq.prompt_ids) | set(seq.output_ids)), dtype=torch.long, device=row.device)
        vals = row[seen]
        row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if seq.output_ids and (p.frequency_penalty != 0.0 or p.presence_penalty != 0.0):
        counts = torch.bincount(torch.tensor(seq.output_ids, dtype=torch.long, device=row.device), minlength=row.shape[0])
        counts = counts[: row.shape[0]].to(row.dtype)
        row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
    if p.logit_bias:
        ids, bias = zip(*p.logit_bias)
        row[list(ids)] += torch.tensor(bias, dtype=row.dtype, device=row.device)


def _top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    vocab = logits.shape[-1]
    # Stable: tied logits (common in bf16, 8 bits of mantissa) keep index order, so the
    # top rank is the token argmax picks and top_k=1 or a tiny top_p equal greedy.
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
    dev = logits.device
    ks = torch.tensor([k if k > 0 else vocab for k in top_k], device=dev).unsqueeze(1)
    ranks = torch.arange(vocab, device=dev).unsqueeze(0)
    sorted_logits = sorted_logits.masked_fill(ranks >= ks, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability mass strictly before each token
    ps = torch.tensor(top_p, dtype=probs.dtype, device=dev).unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill((before > ps) & (ranks > 0), float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
