"""Realistic load on a running stack, with Locust.

    make loadtest HOST=http://127.0.0.1:8000 DURATION=60s USERS=8
    locust -f loadtest/locustfile.py --headless --host http://127.0.0.1:8000 -u 8 -r 1 -t 60s \\
        --csv loadtest/results/locust --csv-full-history

User classes:

* ``StreamingChatUser`` — streaming chat; reports time to first token (``TTFT``) and
  every gap between content chunks (``ITL``) as their own Locust request types;
* ``CompletionUser`` — non-streaming completions;
* ``NoisyTenant`` — one tenant (fixed count 1) that floods: bursts of concurrent
  requests, low priority by default (served after the others, within the aging bound). A 429 is the stack shedding load as designed; it is counted
  under ``noisy flood [429 shed]``, not as a failure;
* ``MultiTurnUser`` — conversations of a few turns on one ``session_id``, the history
  growing each turn (the KV-reuse path);
* ``ToolAgentUser`` — a small tool-calling agent loop: a streamed turn that must call
  a tool (``tool_choice: required``; the arguments are checked against the tool's
  schema), the tool run locally, and the result sent back for the answer;
* ``MediaJobUser`` — async image jobs: submit (202 + job id), poll ``/v1/jobs/{id}``
  until it succeeds or fails. Off unless ``LOCUST_MEDIA=1`` (the stack must serve the
  media model).

Options (flag or environment): ``--model``/``LOCUST_MODEL`` (smollm2-135m),
``--max-tokens``/``LOCUST_MAX_TOKENS`` (32), ``--api-key``/``LOCUST_API_KEY``,
``--noisy-burst``/``LOCUST_NOISY_BURST`` (6), ``--noisy-priority``/``LOCUST_NOISY_PRIORITY``
(low), ``--media-model``/``LOCUST_MEDIA_MODEL``
(sd-turbo). ``LOCUST_STEPS=1,2,4,8`` with ``LOCUST_STEP_S=15`` replaces ``-u``/``-t``
with a staircase of user counts (for throughput-versus-concurrency plots).
Requests use ``ignore_eos`` so every answer has exactly ``max_tokens`` tokens.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import random
import time
import uuid

import gevent
from gevent.pool import Group
from locust import HttpUser, LoadTestShape, between, constant, events, task
from locust.stats import PERCENTILES_TO_REPORT, StatsCSV

from loadtest.prompts import TOPICS

_ids = itertools.count()


@events.init_command_line_parser.add_listener
def _options(parser):
    parser.add_argument("--model", env_var="LOCUST_MODEL", default="smollm2-135m", help="model to load")
    parser.add_argument("--max-tokens", env_var="LOCUST_MAX_TOKENS", type=int, default=32, help="tokens per answer")
    parser.add_argument("--api-key", env_var="LOCUST_API_KEY", default="", help="Bearer key, if the stack wants one")
    parser.add_argument("--noisy-burst", env_var="LOCUST_NOISY_BURST", type=int, default=6,
                        help="concurrent requests per burst of the noisy tenant")
    parser.add_argument("--noisy-priority", env_var="LOCUST_NOISY_PRIORITY", default="low",
                        choices=["high", "normal", "low"], help="priority the noisy tenant asks for")
    parser.add_argument("--media-model", env_var="LOCUST_MEDIA_MODEL", default="sd-turbo",
                        help="image model of MediaJobUser (LOCUST_MEDIA=1)")


@events.test_stop.add_listener
def _final_csv(environment, **_kw) -> None:
    """Locust's CSV writer runs once a second and is stopped before the requests still
    running at the end have finished (``--stop-timeout`` lets them finish, and its
    summary counts them). Write the final numbers once more, after every user stopped:
    ``<prefix>_final_stats.csv`` / ``_final_failures.csv`` / ``_final_exceptions.csv``."""
    prefix = getattr(environment.parsed_options, "csv_prefix", None)
    if not prefix:
        return
    writer = StatsCSV(environment, PERCENTILES_TO_REPORT)
    for name, write in (("stats", writer.requests_csv), ("failures", writer.failures_csv),
                        ("exceptions", writer.exceptions_csv)):
        with open(f"{prefix}_final_{name}.csv", "w", newline="") as f:
            write(csv.writer(f))


class InferstackUser(HttpUser):
    abstract = True
    wait_time = between(0.5, 2.0)

    def on_start(self) -> None:
        o = self.environment.parsed_options
        self.model, self.max_tokens = o.model, o.max_tokens
        self.headers = {"Authorization": f"Bearer {o.api_key}"} if o.api_key else {}
        self.name = f"{type(self).__name__.lower()}-{next(_ids)}"

    def report(self, request_type: str, name: str, ms: float, exc: Exception | None = None) -> None:
        self.environment.events.request.fire(request_type=request_type, name=name, response_time=ms,
                                             response_length=0, exception=exc, context={})

    def body(self, **extra) -> dict:
        return {"model": self.model, "max_tokens": self.max_tokens, "temperature": 0, "ignore_eos": True,
                "user": self.name, **extra}

    def chat_stream(self, name: str, messages: list[dict], **extra) -> str:
        """One streaming chat request: TTFT and ITL as custom events, the whole stream
        as the request's own response time; returns the assistant's text."""
        started = time.perf_counter()
        first = last = None
        text: list[str] = []
        with self.client.post("/v1/chat/completions", name=name, stream=True, catch_response=True,
                              headers=self.headers, json=self.body(messages=messages, stream=True, **extra)) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
                return ""
            done = False
            for line in r.iter_lines(decode_unicode=True):
                if not line or not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    r.failure(f"error mid-stream: {chunk['error'].get('message')}")
                    return ""
                now = time.perf_counter()
                if first is None:
                    first = now
                    self.report("TTFT", name, (now - started) * 1000)
                else:
                    self.report("ITL", name, (now - last) * 1000)
                last = now
                if chunk.get("choices"):
                    text.append(chunk["choices"][0]["delta"].get("content") or "")
            r.request_meta["response_time"] = (time.perf_counter() - started) * 1000
            if not done:
                r.failure("the stream ended without [DONE]")
            else:
                r.success()
        return "".join(text)


class StreamingChatUser(InferstackUser):
    weight = 3

    @task
    def chat(self) -> None:
        topic = random.choice(TOPICS)
        self.chat_stream("chat stream", [{"role": "user", "content": f"Write a short story about {topic}."}])


class CompletionUser(InferstackUser):
    weight = 1

    @task
    def complete(self) -> None:
        prompt = f"Here is a short essay about {random.choice(TOPICS)}:"
        with self.client.post("/v1/completions", name="completion", catch_response=True, headers=self.headers,
                              json=self.body(prompt=prompt)) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
            elif r.json()["usage"]["completion_tokens"] != self.max_tokens:
                r.failure(f"expected {self.max_tokens} tokens, got {r.json()['usage']}")


class NoisyTenant(InferstackUser):
    """One tenant flooding the queue: bursts of concurrent low-priority requests."""

    fixed_count = 1
    wait_time = constant(0.5)

    def on_start(self) -> None:
        super().on_start()
        self.name = "noisy-tenant"

    def one(self, i: int) -> None:
        body = self.body(messages=[{"role": "user", "content": f"Say something about {TOPICS[i % len(TOPICS)]}."}],
                         priority=self.environment.parsed_options.noisy_priority)
        with self.client.post("/v1/chat/completions", name="noisy flood", catch_response=True,
                              headers=self.headers, json=body) as r:
            if r.status_code == 429 and r.headers.get("Retry-After"):
                r.request_meta["name"] = "noisy flood [429 shed]"
                r.success()
            elif r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")

    @task
    def flood(self) -> None:
        group = Group()
        for i in range(self.environment.parsed_options.noisy_burst):
            group.spawn(self.one, i)
        group.join()


class MultiTurnUser(InferstackUser):
    """Conversations of 2-4 turns on one session: each turn sends the whole history."""

    weight = 1

    def on_start(self) -> None:
        super().on_start()
        self.new_session()

    def new_session(self) -> None:
        self.session_id = uuid.uuid4().hex
        self.turns_left = random.randint(2, 4)
        self.messages = [{"role": "system", "content": "You are a concise assistant."}]

    @task
    def turn(self) -> None:
        turn = len(self.messages) // 2 + 1
        self.messages.append({"role": "user", "content": f"Tell me one more fact about {random.choice(TOPICS)}."})
        answer = self.chat_stream("multi-turn" if turn == 1 else "multi-turn follow-up", self.messages,
                                  session_id=self.session_id)
        self.messages.append({"role": "assistant", "content": answer})
        self.turns_left -= 1
        if self.turns_left <= 0:
            self.new_session()


AGENT_TOOLS = [
    {"type": "function", "function": {
        "name": "add", "description": "Add two integers.", "strict": True,
        "parameters": {"type": "object", "additionalProperties": False, "required": ["a", "b"], "properties": {
            "a": {"type": "integer", "minimum": 0, "maximum": 1000},
            "b": {"type": "integer", "minimum": 0, "maximum": 1000}}}}},
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city.", "strict": True,
        "parameters": {"type": "object", "additionalProperties": False, "required": ["city"], "properties": {
            "city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]}}}}},
]


def run_tool(name: str, args: dict) -> str:
    if name == "add":
        return str(args["a"] + args["b"])
    return json.dumps({"city": args["city"], "forecast": "sunny", "celsius": 21})


class ToolAgentUser(InferstackUser):
    """A tool-calling agent: ask, get a (streamed) tool call, run it, send the result
    back, read the answer."""

    weight = 1
    call_tokens = 64
    """The call turn's budget: a whole call, whatever --max-tokens says."""

    @task
    def agent(self) -> None:
        a, b = random.randint(1, 99), random.randint(1, 99)
        messages = [{"role": "user", "content": random.choice([
            f"What is {a} plus {b}?", "Is it warm in Paris today?", f"I have {a} apples and buy {b} more."])}]
        calls = self.stream_tool_calls(messages)
        if not calls:
            return
        messages.append({"role": "assistant", "content": None, "tool_calls": calls})
        for call in calls:
            result = run_tool(call["function"]["name"], json.loads(call["function"]["arguments"]))
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})
        with self.client.post("/v1/chat/completions", name="tool agent answer", catch_response=True,
                              headers=self.headers, json=self.body(messages=messages, tools=AGENT_TOOLS)) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
            elif r.json()["choices"][0]["finish_reason"] is None:
                r.failure("no finish_reason")

    def stream_tool_calls(self, messages: list[dict]) -> list[dict]:
        """The streamed call turn, assembled from OpenAI's tool_call deltas and checked."""
        body = self.body(messages=messages, tools=AGENT_TOOLS, tool_choice="required", parallel_tool_calls=False,
                         stream=True, max_tokens=self.call_tokens)
        calls: dict[int, dict] = {}
        finishes = []
        with self.client.post("/v1/chat/completions", name="tool agent call", stream=True, catch_response=True,
                              headers=self.headers, json=body) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
                return []
            for line in r.iter_lines(decode_unicode=True):
                if not line or not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    r.failure(f"error mid-stream: {chunk['error'].get('message')}")
                    return []
                for choice in chunk.get("choices", []):
                    finishes += [choice["finish_reason"]] if choice["finish_reason"] else []
                    for d in choice["delta"].get("tool_calls") or []:
                        if "id" in d:
                            calls[d["index"]] = {"id": d["id"], "type": "function", "function": dict(d["function"])}
                        else:
                            calls[d["index"]]["function"]["arguments"] += d["function"]["arguments"]
            problem = self.check_calls(list(calls.values()), finishes)
            if problem:
                r.failure(problem)
                return []
            r.success()
        return list(calls.values())

    @staticmethod
    def check_calls(calls: list[dict], finishes: list[str]) -> str | None:
        if finishes != ["tool_calls"] or len(calls) != 1:
            return f"expected one call and finish_reason tool_calls, got {len(calls)} calls, finishes {finishes}"
        tool = next((t for t in AGENT_TOOLS if t["function"]["name"] == calls[0]["function"]["name"]), None)
        try:
            args = json.loads(calls[0]["function"]["arguments"])
        except json.JSONDecodeError:
            return f"arguments are not JSON: {calls[0]['function']['arguments']!r}"
        schema = tool["function"]["parameters"] if tool else {}
        if tool is None or set(args) != set(schema["properties"]):
            return f"call does not match its tool: {calls[0]['function']}"
        return None


class MediaJobUser(InferstackUser):
    """Async image jobs: submit, then poll until the job is done."""

    abstract = os.environ.get("LOCUST_MEDIA") != "1"
    weight = 1
    wait_time = between(2, 5)
    poll_s = 0.5
    timeout_s = 600

    @task
    def image_job(self) -> None:
        started = time.perf_counter()
        body = {"model": self.environment.parsed_options.media_model, "async": True, "user": self.name,
                "prompt": f"a watercolor of {random.choice(TOPICS)}"}
        with self.client.post("/v1/images/generations", name="image job submit", catch_response=True,
                              headers=self.headers, json=body) as r:
            if r.status_code != 202:
                r.failure(f"expected 202, got HTTP {r.status_code}: {r.text[:200]}")
                return
            job_id = r.json()["id"]
            location = r.headers["Location"]  # names the owner in open mode (?user=)
        while time.perf_counter() - started < self.timeout_s:
            gevent.sleep(self.poll_s)
            with self.client.get(location, name="image job poll", catch_response=True,
                                 headers=self.headers) as r:
                if r.status_code != 200:
                    r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
                    return
                status = r.json().get("status")
            if status in ("succeeded", "failed"):
                exc = None if status == "succeeded" else RuntimeError(f"job {job_id} failed: {r.json().get('error')}")
                self.report("JOB", "image job", (time.perf_counter() - started) * 1000, exc)
                return
        self.report("JOB", "image job", (time.perf_counter() - started) * 1000,
                    TimeoutError(f"job {job_id} not done after {self.timeout_s} s"))


if os.environ.get("LOCUST_STEPS"):

    class StepLoad(LoadTestShape):
        """A staircase of user counts, LOCUST_STEP_S seconds each, then stop."""

        steps = [int(x) for x in os.environ["LOCUST_STEPS"].split(",")]
        step_s = float(os.environ.get("LOCUST_STEP_S", "15"))

        def tick(self):
            i = int(self.get_run_time() // self.step_s)
            if i >= len(self.steps):
                return None
            return self.steps[i], float(self.steps[i])
