"""The step planner with a fake cache: admission by blocks, prefill budgets, slots."""

from broker.messages import GenerateRequest, SamplingParams
from gpu_worker.text.planner import StepPlanner
from gpu_worker.text.sequence import SeqStatus, Sequence


class Slots:
    """Counts reserved tokens per open slot, as the paged cache counts blocks."""

    def __init__(self, budget_tokens=None):
        self.open_slots: dict[int, int] = {}
        self.budget_tokens = budget_tokens

    def can_open(self, max_tokens):
        return self.budget_tokens is None or sum(self.open_slots.values()) + max_tokens <= self.budget_tokens

    def open(self, slot, max_tokens):
        assert slot not in self.open_slots
        self.open_slots[slot] = max_tokens

    def close(self, slot):
        del self.open_slots[slot]


def seq(i, prompt_len=4, max_tokens=4):
    req = GenerateRequest(id=f"r{i}", model="m", prompt_token_ids=[1] * prompt_len,
                          params=SamplingParams(max_tokens=max_tokens), reply_to="x")
    return Sequence(req, 0, [1] * prompt_len)


def prefill_all(planner):
    plan = planner.schedule()
    for s, n in zip(plan.prefill, plan.chunks):
        s.num_computed += n
        if s.pending_prefill == 0:
            planner.promote(s)
    return plan


def test_prefill_budget_chunks_long_prompts():
    p = StepPlanner(Slots(), max_seqs=4, max_prefill_tokens=10)
    long, short = seq(0, prompt_len=25), seq(1, prompt_len=3)
    p.add(long)
    p.add(short)
    plan = p.schedule()
    assert [s.request_id for s in plan.prefill] == ["r0"] and plan.chunks == [10]
    long.num_computed += 10
    plan = p.schedule()
    assert plan.chunks == [10]
    long.num_computed += 10
    plan = p.schedule()
    assert [s.request_id for s in plan.prefill] == ["r0", "r1"] and plan.chunks == [5, 3]


def test_slots_are_reused_lowest_first_and_nothing_moves():
    slots = Slots()
    p = StepPlanner(slots, max_seqs=4, max_prefill_tokens=100)
    seqs = [seq(i) for i in range(6)]
    for s in seqs[:4]:
        p.add(s)
    prefill_all(p)
    assert [s.slot for s in seqs[:4]] == [0, 1, 2, 3] and p.free_capacity() == 0
    seqs[1].status = SeqStatus.FINISHED_STOPPED
    p.retire(seqs[1])
    assert seqs[1].slot == -1 and 1 not in slots.open_slots
    assert [s.slot for s in (seqs[0], seqs[2], seqs[3])] == [0, 2, 3]  # the others keep theirs
    p.add(seqs[4])
    plan = p.schedule()
    assert plan.prefill == [seqs[4]] and seqs[4].slot == 1 and len(plan.decode) == 3
    assert all(s.status == SeqStatus.RUNNING for s in plan.decode)


def test_static_mode_admits_only_into_an_empty_batch():
    p = StepPlanner(Slots(), max_seqs=4, max_prefill_tokens=100, static=True)
    a, b = seq(0), seq(1)
    p.add(a)
    prefill_all(p)
    p.add(b)
    assert p.schedule().prefill == []  # b waits although there is room
    a.status = SeqStatus.FINISHED_STOPPED
    p.retire(a)
    assert p.schedule().prefill == [b]


def test_admission_counts_each_sequences_own_length_and_keeps_order():
    slots = Slots(budget_tokens=64)
    p = StepPlanner(slots, max_seqs=8, max_prefill_tokens=1000)
    short = [seq(i, prompt_len=4, max_tokens=6) for i in range(3)]  # 10 tokens each
    long = seq(3, prompt_len=20, max_tokens=20)  # 40 beside the three short ones: 70 > 64
    after = seq(4, prompt_len=2, max_tokens=2)
    for s in short + [long, after]:
        p.add(s)
    plan = p.schedule()
    assert plan.prefill == short and list(p.waiting) == [long, after]  # the head is not overtaken
    short[0].status = SeqStatus.FINISHED_STOPPED
    p.retire(short[0])
    assert p.schedule().prefill[-2:] == [long, after]


def test_a_lone_sequence_is_always_admitted():
    p = StepPlanner(Slots(budget_tokens=10), max_seqs=8, max_prefill_tokens=1000)
    huge = seq(9, prompt_len=200)
    p.add(huge)
    assert p.schedule().prefill == [huge]


def test_clear_closes_every_slot():
    slots = Slots()
    p = StepPlanner(slots, max_seqs=2, max_prefill_tokens=100)
    a, b, c = seq(0), seq(1), seq(2)
    for s in (a, b, c):
        p.add(s)
    p.schedule()
    p.clear()
    assert not slots.open_slots and not p.has_work() and a.slot == b.slot == -1
    p.add(c)
    assert p.schedule().prefill == [c] and c.slot == 0
