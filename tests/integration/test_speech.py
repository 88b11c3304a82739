"""Text-to-speech through the real API, fair queue and a worker running a tiny Kokoro
KModel (real G2P through espeak-ng), driven with the official openai SDK."""

from __future__ import annotations

import base64
import io
import json
import wave

import httpx
import pytest
import soundfile

from tests.stack import Stack

TEXT = "Hello world. This is a test of the speech endpoint!"


@pytest.fixture(scope="module")
def stack(redis_server, tmp_path_factory, tiny_kokoro_dir):
    import redis

    redis.Redis.from_url(redis_server.url).flushall()
    tmp = tmp_path_factory.mktemp("speech")
    models = tmp / "models.toml"
    models.write_text(f'[models."tiny-kokoro"]\nmodality = "speech"\npath = "{tiny_kokoro_dir}"\n'
                      'max_batch = 4\nmemory_gb = 0.3\n')
    s = Stack(redis_server.url, models, tmp / "cache")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(stack):
    from openai import OpenAI

    return OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_openai_sdk_speech_returns_a_valid_wav_at_24khz(client):
    audio = client.audio.speech.create(model="tiny-kokoro", voice="af_heart", input=TEXT, response_format="wav")
    with wave.open(io.BytesIO(audio.content)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (24_000, 1, 2)
        assert w.getnframes() > 0


@pytest.mark.parametrize("fmt", ["flac", "mp3"])
def test_compressed_formats_decode(client, fmt):
    audio = client.audio.speech.create(model="tiny-kokoro", voice="bf_emma", input="Short one.", response_format=fmt)
    samples, rate = soundfile.read(io.BytesIO(audio.content))
    assert rate == 24_000 and len(samples) > 0


def test_pcm_streams_chunk_by_chunk(client):
    with client.audio.speech.with_streaming_response.create(
            model="tiny-kokoro", voice="af_heart", input=TEXT, response_format="pcm") as response:
        assert response.headers["x-sample-rate"] == "24000"
        pcm = b"".join(response.iter_bytes())
    assert len(pcm) > 0 and len(pcm) % 2 == 0


def test_sse_stream_sends_deltas_then_done(stack):
    long_text = " ".join(["This sentence is here to make several chunks."] * 14)
    with httpx.stream("POST", f"{stack.url}/v1/audio/speech", timeout=120, json={
            "model": "tiny-kokoro", "voice": "af_heart", "input": long_text, "stream_format": "sse"}) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    deltas = [e for e in events if e["type"] == "speech.audio.delta"]
    assert len(deltas) >= 2  # more phonemes than one Kokoro chunk holds: streamed in pieces
    assert events[-1]["type"] == "speech.audio.done" and events[-1]["sample_rate"] == 24_000
    assert all(base64.b64decode(d["audio"]) for d in deltas)


@pytest.mark.parametrize("body,status,param", [
    ({"voice": "zz_nobody", "input": "Hi."}, 400, None),
    ({"voice": "af_heart", "input": ""}, 400, "input"),
    ({"voice": "af_heart", "input": "Hi.", "speed": 9}, 400, "speed"),
    ({"voice": "af_heart", "input": "Hi.", "response_format": "ogg"}, 400, "response_format"),
])
def test_bad_speech_requests_are_400(stack, body, status, param):
    r = httpx.post(f"{stack.url}/v1/audio/speech", json={"model": "tiny-kokoro", **body}, timeout=60)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param
