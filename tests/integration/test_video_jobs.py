"""Video generation as an async job through the real API, rq and a worker running a
tiny CogVideoXPipeline: the result is a playable MP4."""

from __future__ import annotations

import subprocess
import time

import httpx
import imageio_ffmpeg
import pytest

from tests.stack import Stack


@pytest.fixture
def stack(redis_url, tmp_path, tiny_cogvideox_dir):
    models = tmp_path / "models.toml"
    models.write_text(f'[models."tiny-video"]\nmodality = "video"\npath = "{tiny_cogvideox_dir}"\nmax_batch = 2\n'
                      'memory_gb = 0.05\nsteps = 2\nguidance_scale = 6.0\nnum_frames = 9\nsize = "16x16"\n')
    s = Stack(redis_url, models, tmp_path / "cache")
    yield s
    s.stop()


def test_video_job_returns_a_playable_mp4(stack, tmp_path):
    r = httpx.post(f"{stack.url}/v1/videos/generations", timeout=30,
                   json={"model": "tiny-video", "prompt": "a cat walks", "fps": 8, "seed": 3, "user": "vera"})
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}?user=vera" and job["kind"] == "video"
    deadline = time.monotonic() + 120
    while (view := httpx.get(f"{stack.url}{r.headers['location']}").json())["status"] \
            not in ("succeeded", "failed"):
        assert time.monotonic() < deadline, view
        time.sleep(0.1)
    assert view["status"] == "succeeded", view
    assert view["progress"] == {"step": 2, "steps": 2}
    file = view["result"]["files"][0]
    assert file["media_type"] == "video/mp4"
    video = httpx.get(file["url"], timeout=30)
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    path = tmp_path / "out.mp4"
    path.write_bytes(video.content)
    # ffmpeg (the one imageio-ffmpeg ships) decodes the whole stream to raw RGB frames
    decoded = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "rawvideo",
                              "-pix_fmt", "rgb24", "-"], capture_output=True, check=True)
    assert decoded.stderr == b""
    assert len(decoded.stdout) == 9 * 16 * 16 * 3  # 9 frames of 16x16


def test_video_is_async_only_and_checks_the_model(stack):
    r = httpx.post(f"{stack.url}/v1/images/generations", json={"model": "tiny-video", "prompt": "x"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_supported"
    r = httpx.post(f"{stack.url}/v1/videos/generations", json={"model": "tiny-video", "prompt": ""}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
