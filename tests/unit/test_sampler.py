"""Sampling parameters, each shown to have its effect on hand-made logits."""

import math

import torch

from broker.messages import GenerateRequest, SamplingParams
from gpu_worker.text.sampler import Sampler
from gpu_worker.text.sequence import Sequence

V = 8
EOS = 7


def mk(output=(), prompt=(0,), **params):
    req = GenerateRequest(id="r", model="m", prompt_token_ids=list(prompt), params=SamplingParams(**params),
                          reply_to="x")
    s = Sequence(req, 0, list(prompt))
    s.output_ids = list(output)
    return s


SAMPLER = Sampler({EOS}, token_text=str)
LOGITS = torch.tensor([[0.0, 1.0, 3.0, 2.9, -1.0, 0.5, 0.2, 2.0]])


def draw(seq, n=300, logits=LOGITS):
    return [SAMPLER(logits, [seq])[0][0] for _ in range(n)]


def test_greedy_is_argmax():
    assert SAMPLER(LOGITS, [mk(temperature=0.0)])[0] == [2]


def test_top_k_restricts_the_support():
    assert set(draw(mk(temperature=1.0, top_k=2))) <= {2, 3}


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.softmax(LOGITS[0], -1)
    assert probs[2] + probs[3] > 0.5
    assert set(draw(mk(temperature=1.0, top_p=0.5))) <= {2, 3}


def test_min_p_cuts_unlikely_tokens():
    # token 3 has 0.90x the top probability (kept), token 7 0.37x (cut at min_p 0.5)
    assert set(draw(mk(temperature=1.0, min_p=0.5))) == {2, 3}


def test_temperature_sharpens():
    cold = draw(mk(temperature=0.05))
    assert cold.count(2) > 200


def test_seed_reproducible_and_position_dependent():
    a = [SAMPLER(LOGITS, [mk(temperature=1.0, seed=42, output=[1] * i)])[0][0] for i in range(20)]
    b = [SAMPLER(LOGITS, [mk(temperature=1.0, seed=42, output=[1] * i)])[0][0] for i in range(20)]
    c = [SAMPLER(LOGITS, [mk(temperature=1.0, seed=43, output=[1] * i)])[0][0] for i in range(20)]
    assert a == b and a != c
    # same seed gives the same draw whatever shares the batch
    batch = SAMPLER(LOGITS.repeat(3, 1), [mk(temperature=1.0), mk(temperature=1.0, seed=42, output=[1] * 5),
                                          mk(temperature=0.0)])[0]
    assert batch[1] == a[5] and batch[2] == 2


def test_min_tokens_blocks_eos_and_stop_ids():
    logits = torch.full((1, V), -5.0)
    logits[0, EOS] = 10.0
    logits[0, 4] = 9.0
    assert SAMPLER(logits, [mk(temperature=0.0, min_tokens=2, output=[1])])[0] == [4]
    assert SAMPLER(logits, [mk(temperature=0.0, min_tokens=2, output=[1, 1])])[0] == [EOS]
    blocked = mk(temperature=0.0, min_tokens=5, stop_token_ids=(4,))
    assert SAMPLER(logits, [blocked])[0] not in ([EOS], [4])


def test_penalties_push_repeated_tokens_down():
    logits = torch.tensor([[0.0, 0.0, 3.0, 2.9, 0.0, 0.0, 0.0, 0.0]])
    assert SAMPLER(logits, [mk(temperature=0.0, output=[2], frequency_penalty=0.2)])[0] == [3]
    assert SAMPLER(logits, [mk(temperature=0.0, output=[2], presence_penalty=0.2)])[0] == [3]
    assert SAMPLER(logits, [mk(temperature=0.0, prompt=[2], repetition_penalty=1.1)])[0] == [3]
    assert SAMPLER(logits, [mk(temperature=0.0, output=[2])])[0] == [2]


def test_logprobs_are_raw_model_logprobs():
    toks, recs, _ = SAMPLER(LOGITS, [mk(temperature=0.0, logprobs=True, top_logprobs=3)])
    expected = torch.log_softmax(LOGITS[0], -1)
    assert math.isclose(recs[0]["logprob"], float(expected[2]), rel_tol=1e-5)
    assert [t["id"] for t in recs[0]["top_logprobs"]] == [2, 3, 7]
    assert SAMPLER(LOGITS, [mk(temperature=0.0)])[1] == [None]


def test_logprobs_of_mixed_rows_come_back_per_row():
    logits = torch.stack([LOGITS[0], LOGITS[0].flip(0), LOGITS[0], torch.full((V,), float("nan"))])
    seqs = [mk(temperature=0.0, logprobs=True, top_logprobs=1), mk(temperature=0.0),
            mk(temperature=0.0, logprobs=True, top_logprobs=0), mk(temperature=0.0, logprobs=True, top_logprobs=2)]
    toks, recs, failures = SAMPLER(logits, seqs)
    assert toks[:3] == [2, V - 1 - 2, 2] and failures == [0, 0, 0, 2]
    assert [t["id"] for t in recs[0]["top_logprobs"]] == [2] and recs[0]["token"] == "2"
    assert recs[1] is None and recs[2]["top_logprobs"] == [] and recs[3] is None  # a failed row reports nothing
    assert math.isclose(recs[2]["logprob"], float(torch.log_softmax(LOGITS[0], -1)[2]), rel_tol=1e-6)


def test_a_vanishing_temperature_is_greedy_not_nan():
    assert SAMPLER(LOGITS, [mk(temperature=1e-9)])[0] == [2]


def test_logit_bias_shifts_only_its_row():
    biased = mk(temperature=0.0, logit_bias=((5, 10.0), (2, -100.0)))
    plain = mk(temperature=0.0)
    tokens, _, _ = SAMPLER(LOGITS.repeat(2, 1), [biased, plain])
    assert tokens == [5, 2]
    assert set(draw(mk(temperature=1.0, logit_bias=((2, -100.0), (3, -100.0), (7, -100.0))))) <= {0, 1, 4, 5, 6}


def test_half_precision_logits_are_sampled_in_fp32():
    # A bf16 model hands over bf16 logits; log-softmax in bf16 (8 bits of mantissa) would
    # round every reported logprob, so the sampler upcasts first.
    half = LOGITS.to(torch.bfloat16)
    tokens, records, failures = SAMPLER(half, [mk(temperature=0.0, logprobs=True, top_logprobs=2)])
    expected = torch.log_softmax(half.float(), -1)[0]
    assert float(torch.log_softmax(half, -1)[0, 2]) != float(expected[2])
    assert tokens == [2] and failures == [0] and records[0]["logprob"] == float(expected[2])
    assert [t["id"] for t in records[0]["top_logprobs"]] == [2, 3]


def test_tied_top_logits_truncate_to_the_greedy_token():
    # bf16 logits tie often; truncation to one token must keep the one argmax picks (the first).
    tied = torch.zeros(1, 4096)
    tied[0, 1000:3000] = 5.0  # 2000 tokens tied for the top
    greedy = SAMPLER(tied, [mk(temperature=0.0)])[0]
    assert greedy == [1000]
    for kw in ({"top_k": 1}, {"top_p": 1e-4}):
        assert {SAMPLER(tied, [mk(temperature=1.5, seed=s, **kw)])[0][0] for s in range(20)} == {1000}, kw


def test_a_broken_row_fails_alone_and_says_why():
    """Poisoned parameters or logits flag their own row; the others sample as if alone."""
    logits = LOGITS.repeat(5, 1)
    logits[3, 2] = float("nan")  # the model's own output went bad
    rows = [
        mk(temperature=0.0),
        mk(temperature=1.0, prompt=[2, 3], repetition_penalty=1e-40),  # overflows to +inf
        mk(temperature=0.0, min_tokens=3, stop_token_ids=tuple(range(V))),  # nothing left to sample
        mk(temperature=1.0),
        mk(temperature=0.0, repetition_penalty=1e-40, prompt=[2]),  # greedy rows are checked too
    ]
    tokens, records, failures = SAMPLER(logits, rows)
    assert failures == [0, 1, 1, 2, 1]
    assert tokens[0] == 2
    alone = SAMPLER(LOGITS, [mk(temperature=0.0)])
    assert (alone[0][0], alone[2]) == (tokens[0], [0])
