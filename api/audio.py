"""PCM chunks from the speech engine -> the audio format the client asked for."""

from __future__ import annotations

import io
import wave

import numpy as np

MEDIA_TYPES = {"wav": "audio/wav", "mp3": "audio/mpeg", "flac": "audio/flac", "pcm": "audio/pcm"}


def encode(pcm: bytes, sample_rate: int, fmt: str) -> bytes:
    """16-bit little-endian mono PCM -> wav, mp3, flac or raw pcm bytes."""
    if fmt == "pcm":
        return pcm
    if fmt == "wav":
        buf = io.BytesIO()
        with wave.open(buf, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(sample_rate)
            w.writeframes(pcm)
        return buf.getvalue()
    import soundfile  # libsndfile (bundled in the wheel) writes FLAC and MP3

    samples = np.frombuffer(pcm, dtype="<i2")
    buf = io.BytesIO()
    soundfile.write(buf, samples, sample_rate, format=fmt.upper())
    return buf.getvalue()
