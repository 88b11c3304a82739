"""The stack on a real Redis Cluster: the API and workers stream two models whose
queues sit on different primaries (and a dropped stream resumes), through a graceful
failover and a killed primary.

What must hold: every stream ends with ``[DONE]`` after every choice finished, or with
an error event; none hangs (the client's timeout would fail the test), none is cut
silently."""

import threading

from openai import OpenAI

from scheduler import keys as qkeys
from tests.sse import stream, texts
from tests.stack import Stack
from tests.stream_outcome import chat
from tests.tiny import TWO_SLOTS

MODELS = TWO_SLOTS  # the tiny model under two names, on different primaries


def test_streams_of_two_models_on_two_primaries(redis_cluster, cluster_target, two_models, tmp_path):
    homes = {redis_cluster.primary_of(qkeys.state(m)) for m in MODELS}
    assert len(homes) == 2
    stack = Stack(cluster_target, two_models, tmp_path / "cache")
    try:
        results = [{} for _ in range(4)]
        threads = [threading.Thread(target=chat, args=(stack.url, MODELS[i % 2], 12, results[i])) for i in range(4)]
        for t in threads:
            t.start()
        sdk = OpenAI(base_url=f"{stack.url}/v1", api_key="unused")  # and the official client, as users do
        chunks = list(sdk.chat.completions.create(model=MODELS[1], stream=True, max_tokens=8,
                                                  messages=[{"role": "user", "content": "Hi"}]))
        assert chunks[-1].choices[0].finish_reason == "length"
        for t in threads:
            t.join()
        assert [r["end"] for r in results] == ["done"] * 4, results

        # A dropped stream resumes with exactly the rest: its record (found by the stream
        # id alone) and its output log (in the model's slot) sit on different nodes.
        url = f"{stack.url}/v1/chat/completions"
        body = {"model": MODELS[0], "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 12,
                "temperature": 0, "ignore_eos": True, "stream": True, "user": "alice"}
        reference = stream("POST", url, json=body)
        head = stream("POST", url, json=body, limit=4)
        rest = stream("GET", f"{url}/{head[0].json['id']}/stream", params={"user": "alice"},
                      headers={"Last-Event-ID": head[-1].id})
        assert [e.id for e in head + rest] == [e.id for e in reference] and texts(head + rest) == texts(reference)
    finally:
        stack.stop()


def test_streams_survive_a_failover_and_a_killed_primary(redis_cluster, cluster_target, two_models, tmp_path):
    """A graceful ``CLUSTER FAILOVER`` under one model's queue, then ``kill -9`` of the
    primary under the other's, while streams of both run."""
    stack = Stack(cluster_target, two_models, tmp_path / "cache", workers=0)
    stack.start_worker(step_delay_s=0.05)  # streams last a few seconds: the failures land mid-stream
    try:
        results = [{} for _ in range(6)]
        started = [threading.Event() for _ in results]
        threads = [threading.Thread(target=chat, args=(stack.url, MODELS[i % 2], 60, results[i], started[i]))
                   for i in range(len(results))]
        for t in threads:
            t.start()
        for ev in started:
            assert ev.wait(60), "a stream never started"
        redis_cluster.failover(redis_cluster.primary_of(qkeys.state(MODELS[0])))
        running = [r for r in results if r["events"][-1].data != "[DONE]"]
        redis_cluster.kill_primary(redis_cluster.primary_of(qkeys.state(MODELS[1])))
        assert running, "every stream had ended before the primary was killed: nothing was tested"
        for t in threads:
            t.join()
        ends = [r["end"] for r in results]
        assert set(ends) <= {"done", "error"}, results  # neither hung nor cut
        # A killed primary may take its last writes with it (replication is asynchronous),
        # which can end a stream with an error; the rest go through both failures.
        assert ends.count("done") >= len(ends) // 2, ends
        for r in results:
            if r["end"] == "done":
                assert r["tokens"] == 60, r  # nothing missing, nothing twice
    finally:
        stack.stop()
        redis_cluster.heal()
