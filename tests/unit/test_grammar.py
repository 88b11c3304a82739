"""The grammar mask on a batch: constrained rows only, at the logits' full width."""

import json

import pytest
import torch

from broker.messages import Constraint
from gpu_worker.text.grammar import GrammarCache, constrain, new_matcher
from gpu_worker.text.sampler import CONSTRAINT_FAILED, NUMERIC_FAILED, Sampler


class Row:
    def __init__(self, grammar=None):
        self.grammar = grammar


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def test_mask_covers_the_logits_width_and_only_constrained_rows(tokenizer):
    width = len(tokenizer) + 45  # a model whose vocab_size is larger than its tokenizer (as Qwen's)
    cache = GrammarCache(tokenizer, width, [tokenizer.eos_token_id])
    compiled = cache.get(Constraint("json_object")).result()
    rows = [Row(), Row(new_matcher(compiled, [])), Row()]
    logits = torch.randn(3, width)
    before = logits.clone()
    constrain(logits, rows)
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    allowed = torch.isfinite(logits[1]).nonzero().flatten().tolist()
    assert allowed and all(tokenizer.decode([t]).lstrip().startswith("{") for t in allowed)
    assert not torch.isfinite(logits[1, len(tokenizer):]).any()  # padded ids are never allowed
    cache.close()


def test_replay_rejects_tokens_the_grammar_does_not_allow(tokenizer):
    cache = GrammarCache(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    compiled = cache.get(Constraint("json_schema", json.dumps({"type": "object"}))).result()
    ok = tokenizer('{"a": 1', add_special_tokens=False)["input_ids"]
    assert new_matcher(compiled, ok) is not None
    assert new_matcher(compiled, tokenizer("hello", add_special_tokens=False)["input_ids"]) is None
    cache.close()


def test_a_row_with_no_allowed_token_fails_alone_through_the_sampler(tokenizer):
    """The sampler's per-row failure path: the emptied row is reported with its own
    reason, a row whose logits were broken anyway keeps the numeric reason, and the
    others sample as if alone."""
    class Nothing:
        def is_terminated(self):
            return False

        def fill_next_token_bitmask(self, bitmask, index):
            bitmask[index] = 0

    from broker.messages import GenerateRequest, SamplingParams
    from gpu_worker.text.sequence import Sequence

    req = GenerateRequest(id="r", model="m", prompt_token_ids=[1], reply_to="x",
                          params=SamplingParams(temperature=0.0, min_tokens=3))
    seqs = [Sequence(req, i, [1]) for i in range(3)]
    seqs[0].grammar = Nothing()
    seqs[2].grammar = Nothing()
    logits = torch.randn(3, 50)
    logits[2, 7] = float("nan")
    sampler = Sampler({0}, str)
    tokens, _, failures = sampler(logits, seqs)
    assert failures == [CONSTRAINT_FAILED, 0, NUMERIC_FAILED]
    alone, _, ok = sampler(logits[1:2], seqs[1:2])
    assert (tokens[1], ok) == (alone[0], [0])


def test_compile_errors_come_back_on_the_future_and_are_not_cached(tokenizer):
    cache = GrammarCache(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    bad = Constraint("regex", "((")
    with pytest.raises(ValueError, match="parenthesis"):
        cache.get(bad).result()
    with pytest.raises(ValueError, match="parenthesis"):
        cache.get(bad).result()
    assert cache.compiles == 2
    good = Constraint("regex", "[ab]+")
    cache.get(good).result()
    assert cache.get(good).done() and cache.compiles == 3
    cache.close()
