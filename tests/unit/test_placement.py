"""Which worker loads a model nobody serves: a pure function of the heartbeats."""

from gpu_worker.demand import choose_worker, served_or_loading
from inferstack.registry import Modality, ModelSpec

GB = 1 << 30


def worker(wid, device="cpu", can_load=("m",), reclaimable=1, models=(), states=None):
    return {"id": wid, "device": device, "can_load": list(can_load), "model_reclaimable_bytes": reclaimable * GB,
            "models": list(models), "states": states or {}}


def spec(device="any"):
    return ModelSpec(name="m", modality=Modality.IMAGE, device=device)


def test_most_memory_wins_among_workers_that_can_load_it():
    workers = [worker("a", reclaimable=4), worker("b", reclaimable=9), worker("c", reclaimable=20, can_load=())]
    assert choose_worker(spec(), workers) == "b"


def test_gpu_workers_are_preferred_and_cuda_affinity_is_binding():
    workers = [worker("cpu-big", reclaimable=64), worker("gpu-small", device="cuda:0", reclaimable=8)]
    assert choose_worker(spec(), workers) == "gpu-small"
    assert choose_worker(spec("cuda"), [worker("cpu-big", reclaimable=64)]) is None
    assert choose_worker(spec("cpu"), workers) == "cpu-big"


def test_ties_break_by_worker_id_so_every_worker_agrees():
    workers = [worker("w2", reclaimable=5), worker("w1", reclaimable=5)]
    assert choose_worker(spec(), workers) == choose_worker(spec(), list(reversed(workers))) == "w1"


def test_a_model_loading_somewhere_counts_as_served():
    workers = [worker("a", models=["x"]), worker("b", states={"m": "loading"})]
    assert served_or_loading(workers) == {"x", "m"}
