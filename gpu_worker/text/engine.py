"""The text engine's step loop: schedule -> forward -> sample -> emit -> retire.

Preemption: a claim may name running requests whose slots it takes (``Claimed.victims``,
decided by ``scheduler.policy``). At the start of the next step each victim leaves the
batch, its KV copied to the DRAM store (or dropped where recomputing is cheaper), and
goes back to the queue (``Outgoing.requeue``); the newcomer takes the first free slot.
A preempted request resumes like one whose worker died: from its output log, here
restoring the DRAM copy, elsewhere recomputing prompt plus tokens sent (a constrained
one replays those tokens into a fresh grammar matcher).

KV reuse: a sequence whose prompt starts with a DRAM store entry (its session's last
turn, a shared prefix, or its own KV from before a preemption) gets those positions
restored into its slot instead of prefilled; where an admitted sequence already holds
that entry's KV, the newcomer takes it from there (``attach``): by reference in the
paged cache (nothing copied), as a row copy in the CPU's slot rows.

Constrained requests wait outside the batch until their grammar is compiled
(``gpu_worker.text.grammar``), then each sequence gets its own matcher.

Faults stay with their request: a row the sampler flags (non-finite numbers, or
penalties or a grammar leaving no token), or an exception in one sequence's admission
or output processing, fails that request alone."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import FIRST_COMPLETED, Future
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field

import torch

from broker.messages import Batch, Claimed, ErrorEvent, GenerateRequest, Running, TokenEvent
from broker.prefix import BLOCK
from gpu_worker.engine import Emit, Outgoing, handed_back
from gpu_worker.text.grammar import GrammarCache, new_matcher
from gpu_worker.text.kvstore import KvEntry, KvStore
from gpu_worker.text.output import OutputProcessor
from gpu_worker.text.planner import StepPlan, StepPlanner
from gpu_worker.text.runner import ModelRunner
from gpu_worker.text.sampler import Sampler, sampling_error
from gpu_worker.text.sequence import SeqStatus, Sequence
from inferstack.registry import ModelSpec

log = logging.getLogger(__name__)


def make_runner(spec: ModelSpec, model_dir, *, device: torch.device, dtype: torch.dtype, max_seqs: int | None = None,
                kv_cache_bytes: int | None = None, tp=None, **options) -> ModelRunner:
    """The engine's runner for ``spec``; tensor-parallel followers build theirs here too,
    so every rank's cache has the same slots, blocks and context length. ``options``:
    ``ModelRunner``'s block size, attention backend and CUDA graphs
    (``WorkerSettings.runner_options``)."""
    return ModelRunner(model_dir, device=device, dtype=dtype, max_slots=max_seqs or spec.max_batch,
                       context_length=spec.context_length, kv_cache_bytes=kv_cache_bytes,
                       memory_bytes=int(spec.memory_gb * (1 << 30)) if spec.memory_gb else None, tp=tp, **options)


def _output_error(request_id: str) -> ErrorEvent:
    return ErrorEvent(request_id, "Turning this request's tokens into text failed on the worker.",
                      type="server_error", code="output_error", status=500)


def _with_claims(view: tuple[Running, ...], claims: list[Claimed]) -> tuple[Running, ...]:
    """The batch once ``claims`` are in: their victims gone, the claimed running (not yet
    preemptible)."""
    victims = {v for c in claims for v in c.victims}
    return tuple(r for r in view if r.rid not in victims) + tuple(
        Running(c.request.id, c.request.user, str(c.request.tier), c.weight, c.request.params.n, 0, 0)
        for c in claims)


def _preempted_key(seq: Sequence) -> str:
    """Where a preempted sequence's KV waits in the DRAM store for its resume."""
    return f"preempted:{seq.request_id}:{seq.choice}"


@dataclass
class _Request:
    claimed: Claimed
    since: int = 0
    """Engine step at which it was admitted (or resumed): the thrash guard counts from it."""
    seqs: list[Sequence] = field(default_factory=list)
    first_event_sent: bool = False
    grammar: Future | None = None
    """Its compiled grammar (constrained requests); it joins the batch once this is done."""
    error: ErrorEvent | None = None
    """It failed alone (its parameters, its grammar, its output processing): sent when it retires."""

    @property
    def request(self) -> GenerateRequest:
        return self.claimed.request

    @property
    def done(self) -> bool:
        return all(s.status.finished for s in self.seqs)


def _ends(events: list[TokenEvent]) -> list[int]:
    """For events sorted by start: how far the output is covered after each one."""
    ends, end = [], 0
    for ev in events:
        end = max(end, ev.start + len(ev.token_ids))
        ends.append(end)
    return ends


class TextEngine:
    def __init__(self, spec: ModelSpec, model_dir, *, device: torch.device, dtype: torch.dtype,
                 max_seqs: int | None = None, max_prefill_tokens: int | None = None, static: bool = False,
                 kv_cache_bytes: int | None = None, kv_dram_bytes: int = 0, prefix_min_hits: int = 2,
                 tp_group=None, runner_options: dict | None = None):
        """``tp_group`` (a joined ``tp.TpGroup`` of which this process is rank 0): run the
        model sharded over the group, the other ranks following (``gpu_worker.text.tp``).
        ``runner_options``: see ``make_runner``."""
        from transformers import AutoTokenizer

        self.model = spec.name
        self.spec = spec
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self._backend_tokenizer = self.tokenizer.backend_tokenizer
        max_seqs = max_seqs or spec.max_batch
        self.runner = make_runner(spec, model_dir, device=device, dtype=dtype, max_seqs=max_seqs,
                                  kv_cache_bytes=kv_cache_bytes, tp=tp_group.tp if tp_group else None,
                                  **(runner_options or {}))
        if tp_group is not None:
            from gpu_worker.text.tp import LeaderRunner

            self.runner = LeaderRunner(self.runner, tp_group)
        self.sampler = Sampler(self._eos_ids(), self._token_text)
        self.grammars = GrammarCache(self.tokenizer, self.runner.model.get_output_embeddings().weight.shape[0],
                                     self.sampler.eos, name=spec.name)
        self._awaiting_grammar: list[_Request] = []
        """Constrained requests whose grammar is still compiling: not in the batch yet."""
        self.planner = StepPlanner(self.runner.cache, max_seqs=max_seqs,
                                   max_prefill_tokens=max_prefill_tokens or spec.max_prefill_tokens, static=static,
                                   on_admit=self._restore)
        self.kv_store = KvStore(kv_dram_bytes, scale=(self.runner.group_token_bytes, self.runner.cache.bytes_per_token)
                                ) if kv_dram_bytes > 0 else None
        """Session and prefix KV caches in host DRAM (None: reuse disabled)."""
        self.prefix_min_hits = prefix_min_hits
        self._prefix_seen: OrderedDict[str, set[str]] = OrderedDict()
        """Block hash -> the distinct sessions (or sessionless requests) that sent it."""
        self._index_ops: list[tuple[str, str, str, int]] = []
        self._holders: dict[str, tuple[KvEntry, Sequence, int]] = {}
        """DRAM entry key -> (the entry, an admitted sequence whose first ``tokens`` cache
        positions hold exactly its KV, tokens): a restore of it takes the KV from there."""
        self._requests: dict[str, _Request] = {}
        self._aborts: set[str] = set()
        self._lock = threading.Lock()  # add/abort arrive from IO threads
        self._inbox: list[tuple[Claimed, list[TokenEvent]]] = []
        self._view: tuple[Running, ...] = ()
        """The batch as the preemption policy sees it, as of the last step (claimer thread reads it)."""
        self.steps = 0
        self.tokens_generated = 0
        self.preemptions = 0

    # -- what the worker calls --------------------------------------------------

    @property
    def context_length(self) -> int:
        return self.runner.context_length

    def capacity(self) -> int:
        with self._lock:
            pending = sum(c.request.params.n for c, _ in self._inbox)
        pending += sum(len(state.seqs) for state in self._awaiting_grammar)
        return max(0, self.planner.free_capacity() - pending)

    def add(self, claimed: Claimed, log_events: list[TokenEvent]) -> None:
        with self._lock:
            self._inbox.append((claimed, log_events))
            # An abort still pending for this id concerned its previous claim (it was
            # preempted or requeued, and is back): a real cancel comes again with the
            # next lease renewal.
            self._aborts.discard(claimed.request.id)

    def batch_view(self) -> Batch:
        """The running batch for the preemption policy: as of the last step, less the
        victims of claims not yet taken in, plus those claims."""
        with self._lock:
            view, inbox = self._view, list(self._inbox)
        return Batch(self.planner.max_seqs, _with_claims(view, [c for c, _ in inbox]))

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.add(request_id)

    def has_work(self) -> bool:
        with self._lock:
            if self._inbox or self._aborts:
                return True
        return self.planner.has_work() or bool(self._awaiting_grammar)

    def request_ids(self) -> list[str]:
        with self._lock:
            return list(self._requests) + [c.request.id for c, _ in self._inbox]

    def step(self, emit: Emit) -> None:
        out: list[Outgoing] = []
        self._take_inbox(out)
        self._start_compiled()
        self._retire_finished(out)  # aborted ones leave before they cost a forward pass
        plan = self.planner.schedule()
        if not plan.empty:
            self._run(plan, out)
        self._retire_finished(out)
        if self._index_ops:
            out.insert(0, Outgoing(self.model, "", "", None, index_ops=self._index_ops))
            self._index_ops = []
        if not self.planner.admitted or self.steps % 64 == 0:
            self.runner.cache.shrink()
        view = self._running_view(self.steps + 1)
        with self._lock:
            self._view = view
        self.steps += 1  # after the view: a claimer that sees this step sees its batch
        if out:
            emit(out)

    def _run(self, plan: StepPlan, out: list[Outgoing]) -> None:
        """One packed forward pass: every decoding sequence's next token and this step's
        prefill chunks; sample where a sequence has a next token to choose."""
        seqs = plan.decode + plan.prefill
        chunks = [[s.output_ids[-1]] for s in plan.decode]
        chunks += [s.token_slice(s.num_computed, n) for s, n in zip(plan.prefill, plan.chunks)]
        completes = [s.num_computed + n == s.length for s, n in zip(plan.prefill, plan.chunks)]
        done = [s for s, c in zip(plan.prefill, completes) if c]
        rows = list(range(len(plan.decode))) + [len(plan.decode) + j for j, c in enumerate(completes) if c]
        logits = self.runner.forward([s.slot for s in seqs], chunks, [s.num_computed for s in seqs], rows)
        for seq, chunk in zip(seqs, chunks):
            seq.num_computed += len(chunk)
        for seq in done:
            self._maybe_store_prefix(seq)
        if rows:
            self._sample_and_emit(logits, plan.decode + done, out)
        for seq in done:
            if not seq.status.finished:
                self.planner.promote(seq)

    def close(self) -> None:
        """Unloading: stop the grammar compile thread and, leading a tensor-parallel group,
        the followers (the weights go with the engine)."""
        self.grammars.close()
        close = getattr(self.runner, "close", None)
        if close is not None:
            close()

    def gauges(self) -> dict[str, float]:
        out = {"batch_size": self.planner.num_admitted, "kv_cache_bytes": self.runner.cache.nbytes}
        if self.kv_store is not None:
            st = self.kv_store.stats
            out.update(kv_store_bytes=self.kv_store.bytes_used, kv_store_hits=st.hits, kv_store_misses=st.misses,
                       kv_store_tokens_saved=st.tokens_saved)
        return out

    def requeue_all(self, message: str, emit: Emit, kind: str = "failed") -> None:
        with self._lock:
            inbox, self._inbox = self._inbox, []
            self._aborts.clear()
            self._view = ()
        held = [s.request for s in self._requests.values()] + [c.request for c, _ in inbox]
        for state in self._requests.values():
            for seq in state.seqs:
                self._release_restore(seq)
        self._requests.clear()
        self._awaiting_grammar.clear()
        self._holders.clear()
        self.planner.clear()
        self.runner.cache.shrink()
        emit(handed_back(self.model, held, message, kind))

    # -- internals --------------------------------------------------------------

    def _take_inbox(self, out: list[Outgoing]) -> None:
        with self._lock:
            inbox, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, set()
            self._view = _with_claims(self._view, [c for c, _ in inbox])
        for claimed, log_events in inbox:
            for victim in claimed.victims:
                self._preempt(victim, claimed.reason, out)
            try:
                self._admit(claimed, log_events, out)
            except Exception:  # noqa: BLE001 - one request's bad state must not fail the batch
                log.exception("%s: admitting %s failed", self.model, claimed.request.id)
                req = claimed.request
                out.append(Outgoing(self.model, req.reply_to, req.id, _output_error(req.id), request_done=True))
        for rid in aborts:
            state = self._requests.get(rid)
            if state:
                for seq in state.seqs:
                    if not seq.status.finished:
                        seq.status = SeqStatus.FINISHED_ABORTED

    def _admit(self, claimed: Claimed, log_events: list[TokenEvent], out: list[Outgoing]) -> None:
        req = claimed.request
        stale = self._requests.pop(req.id, None)
        if stale is not None:
            # Claimed again while still held here: its lease lapsed (Redis was failing over)
            # and came back to this worker. The new claim owns it now and resumes from the
            # log; the old copy leaves without a release, which would end the new claim.
            for seq in stale.seqs:
                self._release_restore(seq)
                self.planner.retire(seq)
        limit = self.context_length
        if len(req.prompt_token_ids) >= limit:
            out.append(Outgoing(self.model, req.reply_to, req.id, ErrorEvent(
                req.id, f"prompt of {len(req.prompt_token_ids)} tokens exceeds the context of {limit}",
                type="invalid_request_error", code="context_length_exceeded", status=400), request_done=True))
            return
        state = _Request(claimed, since=self.steps)
        prior: dict[int, list[TokenEvent]] = {}
        for ev in log_events:
            prior.setdefault(ev.choice, []).append(ev)
        for choice in range(req.params.n):
            seq = Sequence(req, choice, list(req.prompt_token_ids))
            seq.output = OutputProcessor(self._backend_tokenizer, req.params.stop, req.params.skip_special_tokens,
                                         req.prompt_token_ids, reasoning=req.reasoning)
            events = sorted(prior.get(choice, []), key=lambda e: e.start)
            if any(ev.start > end for ev, end in zip(events, [0, *_ends(events)])):
                # A hole in the log (a Redis crash lost writes the client may have seen):
                # continuing past it could repeat or skip text, so the request fails.
                out.append(Outgoing(self.model, req.reply_to, req.id, ErrorEvent(
                    req.id, "this request's output log lost tokens (Redis restarted without them); it cannot "
                    "resume exactly. Retry the request.", type="server_error", code="output_log_gap", status=500),
                    request_done=True))
                return
            if events:
                state.first_event_sent = True
                for ev in events:
                    for tok in ev.token_ids[len(seq.output_ids) - ev.start:]:
                        seq.output_ids.append(tok)
                        seq.output.push(tok)  # rebuild detokenizer and stop state; text was sent
                seq.emitted_tokens = len(seq.output_ids)
                if any(ev.finish_reason for ev in events):
                    seq.status = SeqStatus.FINISHED_STOPPED
            state.seqs.append(seq)
        for seq in state.seqs:
            if not seq.status.finished:
                self._match_cache(seq)
        if req.params.constraint is not None:
            # Rows wait for the grammar (the rest of the batch does not): _start_compiled.
            state.grammar = self.grammars.get(req.params.constraint, req.reasoning)
            self._awaiting_grammar.append(state)
        else:
            self._join_batch(state)
        if self.kv_store is not None:
            # A prefix is worth keeping once several conversations share it (a system
            # prompt); one conversation's own history is its session cache already.
            origin = req.session_key or req.id
            for h in req.prefix_hashes:
                seen = self._prefix_seen.pop(h, set())
                if len(seen) < self.prefix_min_hits:
                    seen.add(origin)
                self._prefix_seen[h] = seen
            while len(self._prefix_seen) > 65536:
                self._prefix_seen.popitem(last=False)
        self._requests[req.id] = state

    def _join_batch(self, state: _Request) -> None:
        """Queue a request's live sequences for slots; a preempting claim goes first (the
        slots its victims freed are for it)."""
        first = bool(state.claimed.victims)
        for seq in reversed(state.seqs) if first else state.seqs:
            if not seq.status.finished:
                self.planner.add(seq, first=first)

    def _start_compiled(self) -> None:
        """Constrained requests whose grammar is ready join the batch, each sequence with
        its own matcher (replaying what a resumed or preempted sequence already
        generated). With nothing else to run, wait a moment for a compile rather than spin."""
        if not self._awaiting_grammar:
            return
        if not self.planner.has_work():
            wait_futures([s.grammar for s in self._awaiting_grammar], timeout=0.01, return_when=FIRST_COMPLETED)
        still = []
        for state in self._awaiting_grammar:
            rid = state.request.id
            if state.done or self._requests.get(rid) is not state:  # aborted or preempted while compiling
                continue
            if not state.grammar.done():
                still.append(state)
                continue
            exc = state.grammar.exception()
            if exc is not None and self.grammars.missing:
                self._fail(rid, ErrorEvent(rid, f"This worker cannot serve the output constraint: {exc}.",
                                           type="server_error", status=500, code="structured_outputs_unavailable"))
                continue
            if exc is not None:
                kind = state.request.params.constraint.kind
                self._fail(rid, ErrorEvent(rid, f"The output constraint could not be compiled: {exc}",
                                           type="invalid_request_error", status=400,
                                           code="invalid_json_schema" if kind.startswith("json") else "invalid_grammar"))
                continue
            for seq in state.seqs:
                if seq.status.finished:
                    continue
                seq.grammar = new_matcher(state.grammar.result(), seq.output_ids)
                if seq.grammar is None:
                    self._fail(rid, ErrorEvent(rid, "The tokens already generated do not match the output "
                                               "constraint.", type="server_error", code="engine_error", status=500))
                    break
            else:
                self._join_batch(state)
        self._awaiting_grammar = still

    def _preempt(self, rid: str, reason: str, out: list[Outgoing]) -> None:
        """Take a request out of the batch and hand it back to the queue; its KV waits in
        DRAM for a resume here, however short: copying a token's KV costs far less than
        computing it again (recomputing a 60-token victim on a CPU costs a whole decode
        step of the batch, each time). One still waiting for its grammar just leaves."""
        state = self._requests.pop(rid, None)
        if state is None:
            return  # it finished or left meanwhile: its slots are free already
        for seq in state.seqs:
            if self.kv_store is not None and seq.slot >= 0 and not seq.status.finished and seq.num_computed > 0:
                self._store(_preempted_key(seq), "preempted", seq, seq.num_computed)
            self._leave(seq)
        self.preemptions += 1
        out.append(Outgoing(self.model, state.request.reply_to, rid, None, requeue="preempted", reason=reason))

    def _fail(self, rid: str, error: ErrorEvent) -> None:
        """This request alone failed: its sequences stop, the error goes out as it retires."""
        state = self._requests[rid]
        state.error = state.error or error
        for seq in state.seqs:
            if not seq.status.finished:
                seq.status = SeqStatus.FINISHED_ABORTED

    def _running_view(self, step: int) -> tuple[Running, ...]:
        view = []
        for rid, state in self._requests.items():
            live = [s for s in state.seqs if not s.status.finished]
            if not live:
                continue
            req = state.request
            admitted = all(s.slot >= 0 for s in live)  # one still waiting for a slot frees nothing yet
            view.append(Running(rid, req.user, str(req.tier), state.claimed.weight, len(live),
                                sum(s.num_computed for s in live), step - state.since if admitted else 0))
        return tuple(view)

    def _sample_and_emit(self, logits: torch.Tensor, seqs: list[Sequence], out: list[Outgoing]) -> None:
        tokens, records, failures = self.sampler(logits, seqs)
        self.tokens_generated += len(tokens)
        for seq, tok, record, failure in zip(seqs, tokens, records, failures):
            if seq.status.finished:  # aborted while in flight, or its request failed
                continue
            if failure:  # incl. a grammar that left no token (sampler.CONSTRAINT_FAILED)
                self._fail(seq.request_id, sampling_error(seq.request_id, failure))
                continue
            if seq.grammar is not None and not seq.grammar.accept_token(tok):
                self._fail(seq.request_id, ErrorEvent(seq.request_id, "The sampled token does not match the output "
                                                      "constraint.", type="server_error", code="engine_error",
                                                      status=500))
                continue
            try:
                seq.output_ids.append(tok)
                if record is not None:
                    seq.logprobs.append(record)
                self._check_stop(seq, tok)
                out.append(self._event(seq))
            except Exception:  # noqa: BLE001 - detokenizing or stop strings of one sequence
                log.exception("%s: output processing of %s failed", self.model, seq.request_id)
                self._fail(seq.request_id, _output_error(seq.request_id))

    def _check_stop(self, seq: Sequence, tok: int) -> None:
        p = seq.params
        text, reasoning, stopped = seq.output.push(tok)
        seq.pending_text += text
        seq.pending_reasoning += reasoning
        n_out = len(seq.output_ids)
        if stopped or (seq.grammar is not None and seq.grammar.is_terminated()):
            seq.status = SeqStatus.FINISHED_STOPPED
        elif n_out >= p.min_tokens and (
            (tok in self.sampler.eos and not p.ignore_eos) or tok in p.stop_token_ids
        ):
            seq.status = SeqStatus.FINISHED_STOPPED
        elif n_out >= p.max_tokens or seq.length >= self.context_length:
            seq.status = SeqStatus.FINISHED_LENGTH
        if seq.status.finished and not stopped:
            tail, tail_reasoning = seq.output.flush()
            seq.pending_text += tail
            seq.pending_reasoning += tail_reasoning

    def _event(self, seq: Sequence) -> Outgoing:
        state = self._requests[seq.request_id]
        ev = TokenEvent(
            request_id=seq.request_id, choice=seq.choice, start=seq.emitted_tokens,
            token_ids=seq.output_ids[seq.emitted_tokens:], text=seq.pending_text, reasoning=seq.pending_reasoning,
            finish_reason=seq.finish_reason, logprobs=seq.logprobs or None,
        )
        if not state.first_event_sent:
            ev.cached_tokens = seq.num_cached
            state.first_event_sent = True
        seq.emitted_tokens = len(seq.output_ids)
        seq.logprobs = []
        seq.pending_text = seq.pending_reasoning = ""
        return Outgoing(self.model, seq.request.reply_to, seq.request_id, ev)

    def _retire_finished(self, out: list[Outgoing]) -> None:
        for rid in list(self._requests):
            state = self._requests[rid]
            for seq in state.seqs:
                if seq.status.finished:
                    if seq.choice == 0 and seq.slot >= 0 and seq.status != SeqStatus.FINISHED_ABORTED:
                        self._save_session(seq)
                    self._leave(seq)
            if state.done:
                del self._requests[rid]
                # Aborted requests get no event: the client is gone, or another worker
                # owns the request now. The release is a no-op for a lost lease. A
                # request that failed on its own gets its error.
                out.append(Outgoing(self.model, state.request.reply_to, rid, state.error, request_done=True))

    # -- KV reuse ---------------------------------------------------------------

    def _match_cache(self, seq: Sequence) -> None:
        if self.kv_store is None:
            return
        entry = self.kv_store.entries.get(_preempted_key(seq))
        if entry is not None and entry.token_ids == seq.all_ids[: len(entry.token_ids)]:
            # Resumed here after a preemption: its own KV, up to the last token sent.
            self.kv_store.acquire(entry)
            seq.restore = (entry, min(len(entry.token_ids), seq.length - 1))
            return
        if seq.output_ids:
            return
        req = seq.request
        hit = self.kv_store.match(seq.prompt_ids, req.session_key, req.prefix_hashes, req.cache_scope)
        self.kv_store.stats.prompt_tokens += len(seq.prompt_ids)
        if hit:
            self.kv_store.acquire(hit[0])
            seq.restore = hit

    def _restore(self, seq: Sequence) -> None:
        """Planner hook: the sequence got its slot; bring the reused KV in and skip its prefill."""
        if seq.restore is None:
            return
        entry, n = seq.restore
        started = time.perf_counter()
        holder = self._holders.get(entry.key)
        if holder is not None and holder[0] is entry and holder[1].slot >= 0 and holder[2] >= n:
            # An admitted sequence holds this entry's KV: take it from there, not from DRAM.
            self.runner.cache.attach(seq.slot, holder[1].slot, n)
            self.kv_store.stats.shared += 1
        else:
            self.runner.restore_kv(entry.key, seq.slot, entry.layers, n)
            if entry.kind != "preempted":  # that one is used up here
                self._holders[entry.key] = (entry, seq, n)
        seq.num_computed = n
        seq.num_cached = 0 if entry.kind == "preempted" else n  # usage reports prompt reuse only
        stats = self.kv_store.stats
        stats.tokens_saved += n
        stats.restores += 1
        stats.restore_s += time.perf_counter() - started
        self._release_restore(seq)
        if entry.kind == "preempted":
            self.kv_store.discard(entry)  # used up: the slot holds it now
            self.runner.drop_kv(entry.key)

    def _leave(self, seq: Sequence) -> None:
        """The sequence gives its slot back (finished, aborted or preempted)."""
        self._release_restore(seq)
        for key in [k for k, h in self._holders.items() if h[1] is seq]:
            del self._holders[key]
        self.planner.retire(seq)

    def _release_restore(self, seq: Sequence) -> None:
        if seq.restore is not None:
            self.kv_store.release(seq.restore[0])
            seq.restore = None

    def _store(self, key: str, kind: str, seq: Sequence, length: int) -> None:
        started = time.perf_counter()
        try:
            entry, evicted = self.kv_store.put(key, kind, seq.all_ids[:length],
                                               self.runner.save_kv(key, seq.slot, length), seq.request.cache_scope)
        except Exception:  # noqa: BLE001 - a cache not kept costs a later recompute, never this batch
            log.exception("%s: keeping %s KV (%d tokens) in DRAM failed", self.model, kind, length)
            self.runner.drop_kv(key)
            return
        self.kv_store.stats.save_s += time.perf_counter() - started
        dropped = {old.key for old in evicted}  # a replaced entry is evicted under the new one's key
        if entry is None:
            dropped.add(key)
        else:
            dropped.discard(key)
        for gone in dropped:
            self.runner.drop_kv(gone)
        for old in evicted:
            if old.kind == "session":
                self._index_ops.append(("del", "s", old.key, 0))
            self._index_ops.extend(("del", "p", h, 0) for h in old.hashes)
        if entry is not None:
            if kind == "session":
                self._index_ops.append(("put", "s", key, length))
            else:
                self._index_ops.extend(("put", "p", h, (j + 1) * BLOCK) for j, h in enumerate(entry.hashes))

    def _save_session(self, seq: Sequence) -> None:
        """After a turn: keep the sequence's tokens and KV for the session's next turn."""
        key = seq.request.session_key
        if self.kv_store is None or not key or seq.num_computed == 0:
            return
        self._store(key, "session", seq, seq.num_computed)

    def _maybe_store_prefix(self, seq: Sequence) -> None:
        """After a prefill: keep the longest whole-block prefix that enough distinct
        conversations (or sessionless requests) have sent."""
        if self.kv_store is None:
            return
        hashes = seq.request.prefix_hashes
        for j in range(len(hashes) - 1, -1, -1):
            if len(self._prefix_seen.get(hashes[j], ())) >= self.prefix_min_hits:
                if hashes[j] not in self.kv_store.prefix_index:
                    length, key = (j + 1) * BLOCK, f"prefix:{hashes[j]}"
                    self._store(key, "prefix", seq, length)
                    if key in self.kv_store.entries:  # its blocks hold the entry while it runs
                        self._holders[key] = (self.kv_store.entries[key], seq, length)
                return

    def kv_stats(self) -> dict:
        if self.kv_store is None:
            return {"enabled": False}
        st, store = self.kv_store.stats, self.kv_store
        return {
            "enabled": True, "bytes_used": store.bytes_used, "budget_bytes": store.budget_bytes,
            "entries": len(store.entries), "sessions": len(store.session_keys()),
            "hits": st.hits, "misses": st.misses, "tokens_saved": st.tokens_saved, "prompt_tokens": st.prompt_tokens,
            "evictions": st.evictions, "save_ms": round(1000 * st.save_s, 3), "saves": st.saves,
            "restore_ms": round(1000 * st.restore_s, 3), "restores": st.restores, "shared_restores": st.shared,
            "bytes_per_token": self.runner.group_token_bytes,
        }

    def index_refresh_ops(self) -> list[tuple[str, str, str, int]]:
        """Everything this engine's store holds, for the heartbeat to keep the index alive."""
        if self.kv_store is None:
            return []
        ops = []
        for entry in list(self.kv_store.entries.values()):
            if entry.kind == "session":
                ops.append(("refresh", "s", entry.key, len(entry.token_ids)))
            ops.extend(("refresh", "p", h, (j + 1) * BLOCK) for j, h in enumerate(entry.hashes))
        return ops

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        gen = getattr(self.runner.model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None)
        for value in (eos if isinstance(eos, list) else [eos]):
            if value is not None:
                ids.add(int(value))
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return ids

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])
