"""The vision-language engine (Qwen2.5-VL): chat with images, streamed token by token
like text and batched by model.

Batching is in waves: waiting requests are admitted together when the previous wave
has finished, prefilled in one forward pass (left-padded, images encoded by the
model's vision tower), then decoded one token per step for every row; finished rows
leave the KV cache at once. Requests do not join a running wave: Qwen2.5-VL's 3-D
rotary positions (``get_rope_index``) make mid-flight joins a cache merge this engine
does not do. Sampling, stop handling and detokenization are the text engine's.
"""

from __future__ import annotations

import base64
import io
import logging
import threading
from pathlib import Path

import torch

from broker.messages import ErrorEvent, GenerateRequest, TokenEvent
from gpu_worker.engine import Emit, Outgoing, handed_back
from gpu_worker.text.kvcache import cache_kwarg
from gpu_worker.text.output import OutputProcessor
from gpu_worker.text.sampler import Sampler, sampling_error
from gpu_worker.text.sequence import SeqStatus, Sequence
from inferstack.registry import ModelSpec
from scheduler.claimed import Claimed

log = logging.getLogger(__name__)


class _Wave:
    """The rows being decoded together, with their cache, mask and rope offsets."""

    def __init__(self, seqs: list[Sequence], cache, mask: torch.Tensor, rope_deltas: torch.Tensor):
        self.seqs, self.cache, self.mask, self.rope_deltas = seqs, cache, mask, rope_deltas

    def keep(self, rows: list[int]) -> None:
        idx = torch.tensor(rows, device=self.mask.device)
        self.cache.batch_select_indices(idx)
        self.mask, self.rope_deltas = self.mask[idx], self.rope_deltas[idx]
        self.seqs = [self.seqs[i] for i in rows]


class VisionEngine:
    def __init__(self, spec: ModelSpec, model_dir: Path | str, *, device: torch.device, dtype: torch.dtype,
                 max_batch: int):
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

        self.model = spec.name
        self.spec = spec
        self.device, self.dtype = device, dtype
        self.max_batch = max_batch
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.processor = AutoImageProcessor.from_pretrained(str(model_dir), backend="pil")
        self.net = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()
        self._cache_kwarg = cache_kwarg(self.net)
        config = self.net.config
        self.image_token_id = config.image_token_id
        self.context_length = spec.context_length or config.get_text_config().max_position_embeddings
        self.sampler = Sampler(self._eos_ids(), lambda t: self.tokenizer.decode([t]))
        self._waiting: list[Sequence] = []
        self._wave: _Wave | None = None
        self._requests: dict[str, list[Sequence]] = {}
        self._errors: dict[str, ErrorEvent] = {}
        """Requests that failed alone (a poisoned row): their error goes out as they retire."""
        self._inbox: list[Claimed] = []
        self._aborts: set[str] = set()
        self._lock = threading.Lock()

    # -- the Engine interface ----------------------------------------------------------

    def capacity(self) -> int:
        with self._lock:
            held = sum(len(seqs) for seqs in self._requests.values()) + sum(c.request.seqs for c in self._inbox)
        return max(0, self.max_batch - held)

    def add(self, claimed: Claimed, log_events: list[TokenEvent]) -> None:
        with self._lock:
            self._inbox.append(claimed)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.add(request_id)

    def has_work(self) -> bool:
        with self._lock:
            if self._inbox or self._aborts:
                return True
        return bool(self._requests)

    def request_ids(self) -> list[str]:
        with self._lock:
            return list(self._requests) + [c.request.id for c in self._inbox]

    @torch.inference_mode()
    def step(self, emit: Emit) -> None:
        out: list[Outgoing] = []
        self._take_inbox(out)
        if self._wave is None and self._waiting:
            self._prefill(out)
        elif self._wave is not None:
            self._decode(out)
        self._retire(out)
        if out:
            emit(out)

    def requeue_all(self, message: str, emit: Emit, kind: str = "failed") -> None:
        with self._lock:
            inbox, self._inbox = self._inbox, []
            self._aborts.clear()
        held = [seqs[0].request for seqs in self._requests.values()] + [c.request for c in inbox]
        self._requests.clear()
        self._errors.clear()
        self._waiting.clear()
        self._wave = None
        emit(handed_back(self.model, held, message, kind))

    def close(self) -> None:
        self.net = None

    # -- internals ---------------------------------------------------------------------

    def _take_inbox(self, out: list[Outgoing]) -> None:
        with self._lock:
            inbox, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, set()
        for claimed in inbox:
            req = claimed.request
            if len(req.prompt_token_ids) >= self.context_length:
                out.append(Outgoing(self.model, req.reply_to, req.id, ErrorEvent(
                    req.id, f"prompt of {len(req.prompt_token_ids)} tokens exceeds the context of "
                    f"{self.context_length}", type="invalid_request_error", code="context_length_exceeded",
                    status=400), request_done=True))
                continue
            if req.params.constraint is not None:  # the API refuses these; never ignore one
                out.append(Outgoing(self.model, req.reply_to, req.id, ErrorEvent(
                    req.id, "structured output is not supported for vision models", type="invalid_request_error",
                    code="unsupported_parameter", status=400), request_done=True))
                continue
            # A request resumed after a worker died starts over: its events carry token
            # offsets, and the API drops what it already relayed.
            seqs = []
            for choice in range(req.params.n):
                seq = Sequence(req, choice, list(req.prompt_token_ids))
                seq.output = OutputProcessor(self.tokenizer.backend_tokenizer, req.params.stop,
                                             req.params.skip_special_tokens, req.prompt_token_ids)
                seqs.append(seq)
            self._requests[req.id] = seqs
            self._waiting.extend(seqs)
        for rid in aborts:
            for seq in self._requests.get(rid, []):
                seq.status = SeqStatus.FINISHED_ABORTED

    def _prefill(self, out: list[Outgoing]) -> None:
        from transformers import DynamicCache

        seqs = [s for s in self._waiting if not s.status.finished][: self.max_batch]
        self._waiting = [s for s in self._waiting if s not in seqs and not s.status.finished]
        if not seqs:
            return
        width = max(len(s.prompt_ids) for s in seqs)
        ids = torch.full((len(seqs), width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, width - len(seq.prompt_ids):] = torch.tensor(seq.prompt_ids)
            mask[row, width - len(seq.prompt_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        images = [self._image(b64) for seq in seqs for b64 in getattr(seq.request, "images", [])]
        kwargs = {}
        text = (mask.cumsum(-1) - 1).clamp(min=0)
        if images:
            pixels = self.processor(images=images, return_tensors="pt")
            kwargs = {"pixel_values": pixels["pixel_values"].to(self.device, self.dtype),
                      "image_grid_thw": pixels["image_grid_thw"].to(self.device)}
            rope, deltas = self.net.model.get_rope_index(
                ids, (ids == self.image_token_id).int(), image_grid_thw=kwargs["image_grid_thw"], attention_mask=mask)
        else:
            rope, deltas = text.unsqueeze(0).expand(3, -1, -1), torch.zeros((len(seqs), 1), dtype=torch.long)
        # [4, batch, len]: 1-D text positions (for the causal mask), then the 3-D rotary ones,
        # as transformers' own generate() passes them.
        positions = torch.cat([text.unsqueeze(0), rope], dim=0)
        cache = DynamicCache(config=self.net.config)
        logits = self.net(input_ids=ids, attention_mask=mask, position_ids=positions, **{self._cache_kwarg: cache},
                          use_cache=True, logits_to_keep=1, **kwargs).logits[:, -1, :]
        self._wave = _Wave(seqs, cache, mask, deltas.to(self.device).view(-1, 1))
        self._sample(logits, seqs, out)

    def _decode(self, out: list[Outgoing]) -> None:
        wave = self._wave
        ids = torch.tensor([[s.output_ids[-1]] for s in wave.seqs], device=self.device)
        wave.mask = torch.cat([wave.mask, torch.ones_like(wave.mask[:, :1])], dim=1)
        text_pos = wave.mask.sum(-1, keepdim=True) - 1
        positions = torch.cat([text_pos.unsqueeze(0), (text_pos + wave.rope_deltas).unsqueeze(0).expand(3, -1, -1)])
        logits = self.net(input_ids=ids, attention_mask=wave.mask, position_ids=positions,
                          **{self._cache_kwarg: wave.cache}, use_cache=True).logits[:, -1, :]
        self._sample(logits, wave.seqs, out)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], out: list[Outgoing]) -> None:
        tokens, records, failures = self.sampler(logits, seqs)
        for seq, tok, record, failure in zip(seqs, tokens, records, failures):
            if seq.status.finished:
                continue
            if failure:  # this request alone: the rest of the wave goes on
                self._errors.setdefault(seq.request_id, sampling_error(seq.request_id, failure))
                for other in self._requests[seq.request_id]:
                    other.status = SeqStatus.FINISHED_ABORTED
                continue
            seq.output_ids.append(tok)
            if record is not None:
                seq.logprobs.append(record)
            text, _, stopped = seq.output.push(tok)
            seq.pending_text += text
            p = seq.params
            if stopped or (len(seq.output_ids) >= p.min_tokens
                           and ((tok in self.sampler.eos and not p.ignore_eos) or tok in p.stop_token_ids)):
                seq.status = SeqStatus.FINISHED_STOPPED
            elif len(seq.output_ids) >= p.max_tokens or seq.length >= self.context_length:
                seq.status = SeqStatus.FINISHED_LENGTH
            if seq.status.finished and not stopped:
                seq.pending_text += seq.output.flush()[0]
            out.append(self._event(seq))

    def _event(self, seq: Sequence) -> Outgoing:
        ev = TokenEvent(request_id=seq.request_id, choice=seq.choice, start=seq.emitted_tokens,
                        token_ids=seq.output_ids[seq.emitted_tokens:], text=seq.pending_text,
                        finish_reason=seq.finish_reason, logprobs=seq.logprobs or None)
        seq.emitted_tokens, seq.logprobs, seq.pending_text = len(seq.output_ids), [], ""
        return Outgoing(self.model, seq.request.reply_to, seq.request_id, ev)

    def _retire(self, out: list[Outgoing]) -> None:
        if self._wave is not None:
            live = [i for i, s in enumerate(self._wave.seqs) if not s.status.finished]
            if not live:
                self._wave = None
            elif len(live) < len(self._wave.seqs):
                self._wave.keep(live)
        for rid in [r for r, seqs in self._requests.items() if all(s.status.finished for s in seqs)]:
            req: GenerateRequest = self._requests.pop(rid)[0].request
            out.append(Outgoing(self.model, req.reply_to, rid, self._errors.pop(rid, None), request_done=True))

    def _image(self, b64: str):
        from PIL import Image

        with Image.open(io.BytesIO(base64.b64decode(b64))) as image:
            return image.convert("RGB")

    def _eos_ids(self) -> set[int]:
        ids = set()
        eos = getattr(self.net.generation_config, "eos_token_id", None)
        for value in eos if isinstance(eos, list) else [eos]:
            if value is not None:
                ids.add(int(value))
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return ids
