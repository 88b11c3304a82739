"""The queue's Redis layout: every key, hash field and channel of one model's queue,
in one table that Python and the Lua scripts share.

Everything here lives under the model's hash tag, ``is:{<model>}:...``, so each
script touches one Redis Cluster slot. The Lua scripts do not spell a key: they get
the prelude :func:`lua_prelude` renders from this table, where the model's fixed keys
arrive as ``KEYS`` (so redis-py routes the call to the node that holds the model) and
the keys a script finds as it runs (a request's hash, the next user's queue) are
built under the same tag. Python builds the same names with the same entries:
``keys.request(model, rid)``.

Keys outside any one model's queue (workers, lifecycle events, media jobs) are in
``broker.keys``."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from broker.keys import PREFIX
from broker.messages import Tier


def tag(model: str) -> str:
    """``is:{model}``: the prefix, and the hash tag, of every key below."""
    return f"{PREFIX}:{{{model}}}"


@dataclass(frozen=True)
class Key:
    """One entry of the table. ``pattern`` follows ``is:{model}:``; ``<param>`` parts
    are filled in order. In Lua a fixed key is ``K_<LUA>`` (from ``KEYS``), a
    parameterized one ``k_<lua>(params...)``, a channel ``C_<LUA>`` / ``c_<lua>(...)``."""

    lua: str
    pattern: str
    kind: str
    """``hash``, ``list``, ``zset``, ``string`` or ``channel`` (sharded pub/sub)."""
    doc: str
    params: tuple[str, ...] = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "params", tuple(re.findall(r"<(\w+)>", self.pattern)))

    def __call__(self, model: str, *args: str) -> str:
        if len(args) != len(self.params):
            raise TypeError(f"{self.lua}: expected {self.params}, got {args}")
        name = self.pattern
        for p, a in zip(self.params, args):
            name = name.replace(f"<{p}>", str(a), 1)
        return f"{tag(model)}:{name}"

    @property
    def fixed(self) -> bool:
        return not self.params and self.kind != "channel"


# -- one model's queue ------------------------------------------------------------

state = Key("state", "state", "hash",
            "Counters of what waits (see STATE_FIELDS), virtual time per tier, the overdue toggle.")
user_counts = Key("ucount", "ucount", "hash",
                  "User -> requests waiting (the per-user cap); a user's field goes at zero.")
leases = Key("leases", "leases", "zset", "In-flight request ids scored by lease expiry (unix seconds).")
alive = Key("alive", "alive", "hash",
            "Worker -> unix time it last claimed or renewed leases of this model: the reaper requeues the "
            "requests of a worker silent for worker_dead_s (a few missed heartbeats) without waiting for "
            "their leases to lapse.")
drain = Key("drain", "drain", "hash", "Observed drain rate of the queue (EWMA of cost units per second).")
doorbell = Key("bell", "bell", "list",
               "Rung (LPUSH, trimmed) when work arrives; idle workers of the model wait on it (BLPOP).")
reaper_lock = Key("reaper", "reaper", "string",
                  "SET NX PX by the worker that reaps this model's lapsed leases this period.")
request = Key("req", "req:<rid>", "hash",
              "The request: payload, user, tier, weight, cost, sequences, start tag, enqueue time, deadline, "
              "state, lease owner, attempts, preemptions, drains, affinity.")
output_log = Key("out", "out:<rid>", "list",
                 "Every event already published for the request (lua/emit.lua appends, fenced by lease "
                 "owner), so a worker taking over after a crash resumes where the dead one stopped and a "
                 "client resumes its stream; expires output_log_ttl_s after the request ends.")
user_queue = Key("uq", "uq:<tier>:<user>", "list", "One user's waiting request ids in one tier, FIFO.")
tier_users = Key("tu", "tu:<tier>", "zset", "Users with waiting work in a tier, by their head request's start tag.")
tier_age = Key("age", "age:<tier>", "zset", "Waiting request ids in a tier by enqueue time (aging, deadlines).")
finish_tags = Key("fin", "fin:<tier>", "zset",
                  "User -> finish tag of the user's last request in a tier (fair queueing); tags the "
                  "virtual time passed are dropped, all of them when the tier drains.")
worker_doorbell = Key("wbell", "bell:<worker>", "list",
                      "Wakes one worker when a request reserved for it (KV affinity) arrives; expires a "
                      "minute after the last ring.")
kv_session = Key("kvs", "kvs:<session>", "hash",
                 "Worker -> 'expiry:tokens' for each worker holding this session's KV cache in DRAM.")
kv_prefix = Key("kvp", "kvp:<block>", "hash",
                "Worker -> 'expiry:tokens' for each worker holding this prefix block's KV cache.")
cancel_channel = Key("cancel", "cancel", "channel",
                     "Sharded channel: ids of running requests cancelled (published by cancel.lua); the "
                     "model's workers drop them at their next step.")
reply_channel = Key("reply", "reply:<api>", "channel",
                    "Sharded channel of one API process for this model: workers publish its requests' "
                    "events here, the process's relay fans them out.")

TABLE: tuple[Key, ...] = (
    state, user_counts, leases, alive, drain, doorbell, reaper_lock, request, output_log, user_queue, tier_users,
    tier_age, finish_tags, worker_doorbell, kv_session, kv_prefix, cancel_channel, reply_channel,
)

FIXED: tuple[Key, ...] = tuple(k for k in TABLE if k.fixed)
"""The keys passed to every script as ``KEYS``, in this order."""


def fixed(model: str) -> list[str]:
    """``KEYS`` of a script call for ``model``."""
    return [k(model) for k in FIXED]


STATE_FIELDS = {
    "waiting": ("len", "Requests waiting, all tiers."),
    "waiting_tier": ("len:<tier>", "Requests waiting in a tier (the exported queue depth)."),
    "cost_tier": ("cost:<tier>", "Their summed cost (prompt + max_tokens x n) in a tier."),
    "vtime": ("v:<tier>", "The tier's virtual time (start-time fair queueing)."),
    "last_overdue": ("last_overdue", "1 when the previous claim served an overdue request."),
}
"""Fields of :data:`state`: Lua reads them as ``F_<NAME>`` / ``f_<name>(tier)``."""


def state_field(name: str, tier: str | None = None) -> str:
    pattern = STATE_FIELDS[name][0]
    return pattern if tier is None else pattern.replace("<tier>", str(tier))


# -- the Lua side -----------------------------------------------------------------

def _lua_concat(pattern: str, head: str | None = None) -> str:
    parts = re.split(r"<(\w+)>", pattern)  # literal, param, literal, ...
    out = [head] if head else []
    for i, part in enumerate(parts):
        if i % 2:
            out.append(part)
        elif part:
            out.append(f'"{part}"')
    return " .. ".join(out)


def lua_prelude() -> str:
    """The head of every script: the model's keys, channels, state fields and tiers."""
    first = FIXED[0]
    lines = [
        "-- Rendered from scheduler/keys.py (the one table of the queue's keys): do not edit here.",
        f"local {', '.join('K_' + k.lua.upper() for k in FIXED)} = "
        + ", ".join(f"KEYS[{i + 1}]" for i in range(len(FIXED))),
        f'local T = string.sub(KEYS[1], 1, -{len(first.pattern) + 2})  -- "is:{{model}}", the hash tag',
    ]
    for k in TABLE:
        if k.fixed:
            continue
        prefix = "c_" if k.kind == "channel" else "k_"
        if not k.params:
            lines.append(f"local {prefix.upper()}{k.lua.upper()} = {_lua_concat(':' + k.pattern, 'T')}")
        else:
            lines.append(f"local function {prefix}{k.lua}({', '.join(k.params)}) "
                         f"return {_lua_concat(':' + k.pattern, 'T')} end")
    for name, (pattern, _) in STATE_FIELDS.items():
        if "<tier>" in pattern:
            lines.append(f"local function f_{name}(tier) return {_lua_concat(pattern)} end")
        else:
            lines.append(f'local F_{name.upper()} = "{pattern}"')
    lines.append("local TIERS = {" + ", ".join(f'"{t.value}"' for t in Tier) + "}")
    lines.append("local RANK = {" + ", ".join(f"{t.value} = {t.rank}" for t in Tier) + "}")
    return "\n".join(lines) + "\n"
