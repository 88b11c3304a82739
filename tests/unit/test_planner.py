"""The step planner with a fake row mover: admission, budgets, row layout."""

from broker.messages import GenerateRequest, SamplingParams
from gpu_worker.text.planner import StepPlanner
from gpu_worker.text.sequence import SeqStatus, Sequence


class Rows:
    """Tracks which sequence's data sits in which row, as the KV cache would."""

    def move_row(self, src, dst):
        self.data[dst] = self.data.pop(src)

    def swap_rows(self, a, b):
        self.data[a], self.data[b] = self.data.get(b), self.data.get(a)

    def __init__(self, budget_tokens=None):
        self.data = {}
        self.budget_tokens = budget_tokens

    def fits(self, rows, length):
        return self.budget_tokens is None or rows * length <= self.budget_tokens


def seq(i, prompt_len=4):
    req = GenerateRequest(id=f"r{i}", model="m", prompt_token_ids=[1] * prompt_len,
                          params=SamplingParams(max_tokens=4), reply_to="x")
    return Sequence(req, 0, [1] * prompt_len)


def check_layout(planner, rows):
    for row, s in enumerate(planner.slots):
        assert s.slot == row and rows.data.get(row) is s
    assert all(s.status == SeqStatus.RUNNING for s in planner.slots[: planner.n_running])
    assert all(s.status == SeqStatus.PREFILLING for s in planner.slots[planner.n_running:])


def admit_and_prefill(planner, rows):
    plan = planner.schedule()
    for s in plan.prefill:
        rows.data.setdefault(s.slot, s)
    return plan


def test_prefill_budget_chunks_long_prompts():
    rows = Rows()
    p = StepPlanner(rows, max_seqs=4, max_prefill_tokens=10)
    long, short = seq(0, prompt_len=25), seq(1, prompt_len=3)
    p.add(long)
    p.add(short)
    plan = admit_and_prefill(p, rows)
    assert [s.request_id for s in plan.prefill] == ["r0"] and plan.chunks == [10]
    long.num_computed += 10
    plan = p.schedule()
    assert plan.chunks == [10]
    long.num_computed += 10
    plan = p.schedule()
    assert [s.request_id for s in plan.prefill] == ["r0", "r1"] and plan.chunks == [5, 3]


def test_rows_stay_contiguous_as_sequences_come_and_go():
    rows = Rows()
    p = StepPlanner(rows, max_seqs=4, max_prefill_tokens=100)
    seqs = [seq(i) for i in range(6)]
    for s in seqs[:4]:
        p.add(s)
    plan = admit_and_prefill(p, rows)
    for s in plan.prefill:
        s.num_computed = s.length
        p.promote(s)
    check_layout(p, rows)
    assert p.free_capacity() == 0
    # a middle one finishes, a newcomer joins and starts prefilling
    seqs[1].status = SeqStatus.FINISHED_STOPPED
    p.retire(seqs[1])
    check_layout(p, rows)
    p.add(seqs[4])
    plan = admit_and_prefill(p, rows)
    assert plan.prefill == [seqs[4]] and len(plan.decode) == 3
    check_layout(p, rows)
    # a decoding row retires while one is prefilling: the prefilling row moves down
    seqs[0].status = SeqStatus.FINISHED_LENGTH
    p.retire(seqs[0])
    check_layout(p, rows)
    seqs[4].num_computed = seqs[4].length
    p.promote(seqs[4])
    check_layout(p, rows)
    assert {s.request_id for s in p.slots} == {"r2", "r3", "r4"}


def test_static_mode_admits_only_into_an_empty_batch():
    rows = Rows()
    p = StepPlanner(rows, max_seqs=4, max_prefill_tokens=100, static=True)
    a, b = seq(0), seq(1)
    p.add(a)
    admit_and_prefill(p, rows)
    p.add(b)
    assert p.schedule().prefill == [a]  # b waits although there is room
    a.status = SeqStatus.FINISHED_STOPPED
    p.retire(a)
    assert admit_and_prefill(p, rows).prefill == [b]


def test_admission_respects_the_kv_budget():
    rows = Rows(budget_tokens=3 * 20)  # three sequences of 20 positions
    p = StepPlanner(rows, max_seqs=8, max_prefill_tokens=1000)
    seqs = [seq(i, prompt_len=12) for i in range(5)]  # 12 + 4 max_tokens = 16 <= 20
    for s in seqs:
        p.add(s)
    plan = admit_and_prefill(p, rows)
    assert len(plan.prefill) == 3 and len(p.waiting) == 2
    huge = seq(9, prompt_len=200)  # alone it exceeds the budget: admitted only into an empty batch
    p2 = StepPlanner(Rows(budget_tokens=60), max_seqs=8, max_prefill_tokens=1000)
    p2.add(huge)
    assert admit_and_prefill(p2, Rows()).prefill == [huge]
