"""Image generation through the real API, rq and a worker running a tiny
StableDiffusionPipeline: the official openai SDK, async jobs and their lifecycle,
batching, cancellation, expiry and ownership."""

from __future__ import annotations

import base64
import csv
import io
import os
import subprocess
import sys
import threading
import time

import httpx
import pytest
from PIL import Image

from broker import keys
from tests.stack import Stack


@pytest.fixture
def registry(tmp_path, tiny_sd_dir):
    path = tmp_path / "models.toml"
    path.write_text(f'[models."tiny-sd"]\nmodality = "image"\npath = "{tiny_sd_dir}"\nmax_batch = 4\n'
                    'memory_gb = 0.01\nsteps = 2\nsize = "32x32"\n')
    return path


@pytest.fixture
def keys_file(tmp_path):
    path = tmp_path / "keys.toml"
    path.write_text('[keys.alice-key]\nuser = "alice"\n\n[keys.bob-key]\nuser = "bob"\n')
    return path


def make_stack(redis_url, registry, tmp_path, workers=1, **api_kw):
    return Stack(redis_url, registry, tmp_path / "cache", workers=workers, worker_kw={"worker_models": "tiny-sd"},
                 api_kw=api_kw, key="alice-key")


@pytest.fixture
def stack(redis_url, registry, tmp_path):
    s = make_stack(redis_url, registry, tmp_path)
    yield s
    s.stop()


@pytest.fixture
def idle_stack(redis_url, registry, tmp_path, keys_file):
    """API only: jobs stay queued until the test starts a worker."""
    s = make_stack(redis_url, registry, tmp_path, workers=0, keys_file=keys_file, max_jobs_per_user=3)
    yield s
    s.stop()


ALICE = {"Authorization": "Bearer alice-key"}
BOB = {"Authorization": "Bearer bob-key"}


def png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.format == "PNG"
    return image


def submit(stack, headers=ALICE, **body):
    r = httpx.post(f"{stack.url}/v1/images/generations", headers=headers, timeout=30,
                   json={"model": "tiny-sd", "prompt": "a red cat", "async": True, **body})
    assert r.status_code == 202, r.text
    # In open mode the owner is the body's `user`; the Location carries it for the GETs.
    owner = f"?user={body['user']}" if "user" in body and not headers else ""
    assert r.headers["location"] == f"/v1/jobs/{r.json()['id']}{owner}"
    return {**r.json(), "location": r.headers["location"]}


def get_job(stack, job_id, headers=ALICE):
    return httpx.get(f"{stack.url}/v1/jobs/{job_id}", headers=headers, timeout=30)


def wait_status(stack, job_id, statuses, headers=ALICE, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        view = get_job(stack, job_id, headers).json()
        if view["status"] in statuses:
            return view
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached {statuses}: {view}")


class StepGate:
    """Holds the job consumer after a given denoising step until released, so the
    test can look at (and cancel) a job while it runs."""

    def __init__(self, at_step: int):
        self.at_step, self.reached, self.release = at_step, threading.Event(), threading.Event()
        self.seen: list[tuple[str, int, int]] = []

    def __call__(self, job_id, step, steps):
        self.seen.append((job_id, step, steps))
        if step == self.at_step:
            self.reached.set()
            self.release.wait(30)

    def attach(self, worker):
        worker.jobs.step_observers.append(self)


def test_openai_sdk_generates_decodable_pngs(stack):
    from openai import OpenAI

    client = OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0, timeout=60)
    result = client.images.generate(model="tiny-sd", prompt="a red cat", n=2, size="32x32",
                                    response_format="b64_json", extra_body={"seed": 7})
    assert len(result.data) == 2
    for item in result.data:
        assert png(base64.b64decode(item.b64_json)).size == (32, 32)

    by_url = client.images.generate(model="tiny-sd", prompt="a blue dog", size="32x32", response_format="url")
    r = httpx.get(by_url.data[0].url, timeout=30)  # the URL's token grants access by itself
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert png(r.content).size == (32, 32)


def test_job_goes_queued_then_running_with_progress_then_succeeded(idle_stack, rclient):
    job = submit(idle_stack, size="32x32", steps=3, n=2)
    assert job["status"] == "queued" and job["progress"] is None and job["result"] is None
    assert get_job(idle_stack, job["id"]).json()["status"] == "queued"

    gate = StepGate(at_step=1)
    idle_stack.start_worker(setup=gate.attach)
    assert gate.reached.wait(60)
    running = get_job(idle_stack, job["id"]).json()
    assert running["status"] == "running" and running["started_at"] is not None
    assert running["progress"] == {"step": 1, "steps": 3}
    gate.release.set()

    done = wait_status(idle_stack, job["id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded", done
    assert done["progress"] == {"step": 3, "steps": 3}
    assert done["finished_at"] >= done["started_at"] >= done["created_at"]
    files = done["result"]["files"]
    assert [f["media_type"] for f in files] == ["image/png", "image/png"]
    content = httpx.get(f"{idle_stack.url}/v1/jobs/{job['id']}/content/1", headers=ALICE, timeout=30)
    assert png(content.content).size == (32, 32)
    assert rclient.zcard(keys.user_jobs("alice")) == 0


def test_queued_jobs_of_one_model_run_as_one_batch(idle_stack):
    jobs = [submit(idle_stack, prompt=p, size="32x32") for p in ("one", "two", "three")]
    gate = StepGate(at_step=0)  # never blocks; records which jobs ran each step
    idle_stack.start_worker(setup=gate.attach)
    for job in jobs:
        assert wait_status(idle_stack, job["id"], {"succeeded", "failed"})["status"] == "succeeded"
    first_step = {job_id for job_id, step, _ in gate.seen if step == 1}
    assert first_step == {j["id"] for j in jobs}  # all three in the same denoising loop


def test_cancel_a_queued_and_a_running_job(idle_stack, rclient):
    queued = submit(idle_stack, prompt="never runs", size="32x32")
    r = httpx.delete(f"{idle_stack.url}/v1/jobs/{queued['id']}", headers=ALICE, timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"

    running = submit(idle_stack, prompt="stopped midway", size="32x32", steps=3)
    gate = StepGate(at_step=1)
    idle_stack.start_worker(setup=gate.attach)
    assert gate.reached.wait(60)
    r = httpx.delete(f"{idle_stack.url}/v1/jobs/{running['id']}", headers=ALICE, timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    gate.release.set()
    consumer = idle_stack.workers[0].worker.jobs
    deadline = time.monotonic() + 30
    while not consumer.idle():  # the batch has ended (interrupted at the next step)
        assert time.monotonic() < deadline
        time.sleep(0.05)
    view = get_job(idle_stack, running["id"]).json()
    assert view["status"] == "cancelled" and view["result"] is None
    assert all(job_id != queued["id"] for job_id, _, _ in gate.seen)  # the queued one never ran
    assert not [s for job_id, s, _ in gate.seen if job_id == running["id"] and s > 1]  # stopped after step 1
    assert httpx.get(f"{idle_stack.url}/v1/jobs/{running['id']}/content/0", headers=ALICE).status_code == 404
    assert rclient.zcard(keys.user_jobs("alice")) == 0


def test_another_users_job_is_404_and_a_user_cap_applies(idle_stack):
    job = submit(idle_stack, size="32x32")
    assert get_job(idle_stack, job["id"], BOB).status_code == 404
    assert httpx.delete(f"{idle_stack.url}/v1/jobs/{job['id']}", headers=BOB).status_code == 404
    assert httpx.get(f"{idle_stack.url}/v1/jobs/{job['id']}/content/0", headers=BOB).status_code == 404
    assert get_job(idle_stack, job["id"], ALICE).json()["status"] == "queued"
    assert get_job(idle_stack, "img-doesnotexist", ALICE).status_code == 404

    submit(idle_stack, size="32x32")
    submit(idle_stack, size="32x32")  # alice now has 3 in flight, the cap
    r = httpx.post(f"{idle_stack.url}/v1/images/generations", headers=ALICE, timeout=30,
                   json={"model": "tiny-sd", "prompt": "one too many", "async": True})
    assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_jobs"
    submit(idle_stack, headers=BOB, size="32x32")  # other users are not affected


def test_results_expire_after_their_ttl(redis_url, registry, tmp_path):
    stack = make_stack(redis_url, registry, tmp_path, job_result_ttl_s=1)
    try:
        job = submit(stack, headers={}, user="carol", size="32x32")  # open mode: `user` names the owner
        assert httpx.get(f"{stack.url}/v1/jobs/{job['id']}", params={"user": "dave"}).status_code == 404
        deadline = time.monotonic() + 60
        seen = set()
        while time.monotonic() < deadline:
            r = httpx.get(f"{stack.url}{job['location']}", timeout=30)  # ?user=carol
            if r.status_code == 404:
                break
            seen.add(r.json()["status"])
            time.sleep(0.1)
        assert "succeeded" in seen and r.status_code == 404, (seen, r.status_code)
    finally:
        stack.stop()


@pytest.mark.parametrize("body,param", [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "x", "size": "33x32"}, "size"),
    ({"prompt": "x", "n": 9}, "n"),
    ({"prompt": "x", "response_format": "gif"}, "response_format"),
])
def test_bad_image_requests_are_400(stack, body, param):
    r = httpx.post(f"{stack.url}/v1/images/generations", json={"model": "tiny-sd", **body}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_locust_media_user_submits_and_polls_jobs_without_failures(stack, tmp_path):
    """``make loadtest``'s runner with only the async-media user class (LOCUST_MEDIA=1):
    jobs are submitted (202), polled and all succeed."""
    prefix = tmp_path / "locust"
    run = subprocess.run(
        [sys.executable, "-m", "loadtest.run", "--host", stack.url, "--users", "2", "--spawn-rate", "2",
         "--duration", "10s", "--csv", str(prefix), "MediaJobUser"],
        env={**os.environ, "LOCUST_MEDIA": "1", "LOCUST_MEDIA_MODEL": "tiny-sd"},
        capture_output=True, text=True, timeout=180, check=False)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    with open(f"{prefix}_final_stats.csv", newline="") as f:
        rows = {r["Name"]: r for r in csv.DictReader(f)}
    assert rows["Aggregated"]["Failure Count"] == "0"
    assert int(rows["image job submit"]["Request Count"]) >= 2
    assert int(rows["image job poll"]["Request Count"]) >= 1
    # One JOB event per finished job, all succeeded (a failed job is a Locust failure).
    assert int(rows["image job"]["Request Count"]) >= 2
