"""Text-to-speech with Kokoro (the ``kokoro`` package's KModel), through the fair queue
like text: each step synthesizes the next chunk (a few sentences, at most the model's
510 phonemes) of every held request and emits it, so audio streams chunk by chunk and
a long text does not hold up short ones.

Text -> phonemes (G2P): misaki's English G2P when its spaCy model (``en_core_web_sm``)
is installed; otherwise espeak-ng through misaki's ``EspeakG2P`` (the ``espeakng-loader``
wheel ships espeak-ng and its data, so this works offline). Other Kokoro languages
(voice prefixes e, f, h, i, p) always use espeak-ng, as KPipeline does."""

from __future__ import annotations

import base64
import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from broker.messages import AudioChunk, ErrorEvent, SpeechRequest
from gpu_worker.engine import Emit, Outgoing, handed_back
from inferstack.registry import ModelSpec
from scheduler.claimed import Claimed

log = logging.getLogger(__name__)

SAMPLE_RATE = 24_000
MAX_PHONEMES = 510
"""Kokoro's context is 512 tokens including the two boundary tokens."""

ESPEAK_LANGUAGES = {"a": "en-us", "b": "en-gb", "e": "es", "f": "fr-fr", "h": "hi", "i": "it", "p": "pt-br"}
"""Kokoro voice prefix (first letter of the voice name) -> espeak-ng language."""

OPENAI_VOICES = {"alloy": "af_alloy", "ash": "am_adam", "ballad": "bm_george", "coral": "af_heart",
                 "echo": "am_echo", "fable": "bm_fable", "nova": "af_nova", "onyx": "am_onyx",
                 "sage": "af_sarah", "shimmer": "af_jessica", "verse": "am_michael"}
"""OpenAI voice names -> the closest Kokoro-82M voice."""

_SENTENCE = re.compile(r"(?<=[.!?;:…])\s+|\n+")


def english_g2p(british: bool):
    """misaki's lexicon G2P when its spaCy model is installed (never downloaded here)."""
    import spacy.util

    if not spacy.util.is_package("en_core_web_sm"):
        return None
    from misaki import en, espeak

    return en.G2P(trf=False, british=british, fallback=espeak.EspeakFallback(british=british), unk="")


class Phonemizer:
    def __init__(self):
        self._g2p: dict[str, object] = {}
        self._lock = threading.Lock()

    def __call__(self, text: str, lang: str) -> str:
        with self._lock:
            g2p = self._g2p.get(lang)
            if g2p is None:
                g2p = self._g2p[lang] = self._make(lang)
        phonemes, _ = g2p(text)
        return phonemes or ""

    @staticmethod
    def _make(lang: str):
        if lang in "ab":
            g2p = english_g2p(british=lang == "b")
            if g2p is not None:
                return g2p
            log.info("English G2P: espeak-ng (install the spaCy model en_core_web_sm for misaki's lexicon G2P)")
        from misaki import espeak

        return espeak.EspeakG2P(language=ESPEAK_LANGUAGES[lang])


def split_phonemes(text: str, phonemize, limit: int = MAX_PHONEMES) -> list[str]:
    """Phonemize sentence by sentence and pack sentences into chunks of at most
    ``limit`` phonemes (a single longer sentence is cut at word boundaries)."""
    chunks, current = [], ""
    for sentence in (s.strip() for s in _SENTENCE.split(text)):
        if not sentence:
            continue
        ps = phonemize(sentence).strip()
        pieces = [ps] if len(ps) <= limit else _cut(ps, limit)
        for piece in pieces:
            if current and len(current) + 1 + len(piece) > limit:
                chunks.append(current)
                current = ""
            current = f"{current} {piece}".strip()
    if current:
        chunks.append(current)
    return chunks


def _cut(ps: str, limit: int) -> list[str]:
    out, current = [], ""
    for word in ps.split(" "):
        while len(word) > limit:
            out.append(word[:limit])
            word = word[limit:]
        if current and len(current) + 1 + len(word) > limit:
            out.append(current)
            current = ""
        current = f"{current} {word}".strip()
    return out + ([current] if current else [])


@dataclass
class _Speech:
    request: SpeechRequest
    voice: torch.Tensor
    chunks: list[str]
    next: int = 0
    aborted: bool = False


@dataclass
class _Inbox:
    claimed: list[Claimed] = field(default_factory=list)
    aborts: set[str] = field(default_factory=set)


class SpeechEngine:
    def __init__(self, spec: ModelSpec, model_dir: Path | str, *, device: torch.device, max_batch: int):
        from kokoro import KModel

        self.model = spec.name
        self.spec = spec
        self.device = device
        self.max_batch = max_batch
        model_dir = Path(model_dir)
        weights = sorted(model_dir.glob("*.pth"))
        if not weights:
            raise FileNotFoundError(f"{model_dir}: no Kokoro weights (*.pth)")
        self.kmodel = KModel(repo_id=spec.hf_id or "hexgrad/Kokoro-82M", config=str(model_dir / "config.json"),
                             model=str(weights[0])).to(device).eval()
        self.voices_dir = model_dir / "voices"
        self._voices: dict[str, torch.Tensor] = {}
        self.phonemize = Phonemizer()
        self._held: dict[str, _Speech] = {}
        self._inbox = _Inbox()
        self._lock = threading.Lock()

    def voice_names(self) -> list[str]:
        return sorted(p.stem for p in self.voices_dir.glob("*.pt"))

    # -- the Engine interface -------------------------------------------------------

    def capacity(self) -> int:
        with self._lock:
            return max(0, self.max_batch - len(self._held) - len(self._inbox.claimed))

    def add(self, claimed: Claimed, log_events) -> None:
        with self._lock:
            self._inbox.claimed.append(claimed)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._inbox.aborts.add(request_id)

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._held or self._inbox.claimed or self._inbox.aborts)

    def request_ids(self) -> list[str]:
        with self._lock:
            return list(self._held) + [c.request.id for c in self._inbox.claimed]

    def step(self, emit: Emit) -> None:
        out: list[Outgoing] = []
        with self._lock:
            claimed, self._inbox.claimed = self._inbox.claimed, []
            aborts, self._inbox.aborts = self._inbox.aborts, set()
        for c in claimed:
            self._admit(c.request, out)
        for rid in aborts:
            if rid in self._held:
                del self._held[rid]
                out.append(Outgoing(self.model, "", rid, None, request_done=True))
        for speech in list(self._held.values()):
            out.append(self._synthesize(speech))
            if speech.next >= len(speech.chunks):
                del self._held[speech.request.id]
        if out:
            emit(out)

    def requeue_all(self, message: str, emit: Emit, kind: str = "failed") -> None:
        with self._lock:
            held = [s.request for s in self._held.values()] + [c.request for c in self._inbox.claimed]
            self._held.clear()
            self._inbox = _Inbox()
        emit(handed_back(self.model, held, message, kind))

    def close(self) -> None:
        self.kmodel = None

    # -- internals ------------------------------------------------------------------

    def _admit(self, req: SpeechRequest, out: list[Outgoing]) -> None:
        voice_name = OPENAI_VOICES.get(req.voice, req.voice)
        try:
            voice = self._voice(voice_name)
            lang = voice_name[0]
            if lang not in ESPEAK_LANGUAGES:
                raise ValueError(f"voice {voice_name!r} needs a G2P for language {lang!r} that this worker lacks")
            chunks = split_phonemes(req.input, lambda text: self.phonemize(text, lang))
            if not chunks:
                raise ValueError("the input has nothing to speak")
        except ValueError as exc:
            out.append(Outgoing(self.model, req.reply_to, req.id, ErrorEvent(
                req.id, str(exc), type="invalid_request_error", code="invalid_value", status=400),
                request_done=True))
            return
        self._held[req.id] = _Speech(req, voice, chunks)

    def _voice(self, name: str) -> torch.Tensor:
        if name not in self._voices:
            path = self.voices_dir / f"{name}.pt"
            if not re.fullmatch(r"[a-z]{2}_[a-z0-9]+", name) or not path.exists():
                raise ValueError(f"unknown voice {name!r}; this model has: {', '.join(self.voice_names())}")
            self._voices[name] = torch.load(path, weights_only=True, map_location="cpu")
        return self._voices[name]

    @torch.inference_mode()
    def _synthesize(self, speech: _Speech) -> Outgoing:
        req = speech.request
        phonemes = speech.chunks[speech.next]
        ref = speech.voice[len(phonemes) - 1].to(self.device)
        audio = self.kmodel(phonemes, ref, req.speed)
        pcm = (np.clip(audio.float().cpu().numpy(), -1.0, 1.0) * 32767).astype("<i2").tobytes()
        index = speech.next
        speech.next += 1
        final = speech.next >= len(speech.chunks)
        return Outgoing(self.model, req.reply_to, req.id,
                        AudioChunk(req.id, index, SAMPLE_RATE, base64.b64encode(pcm).decode(), final),
                        request_done=final)
