-- Admit one request, or refuse it with a reason and a Retry-After.
-- ARGV: prefix, rid, payload, user, tier, cost, weight, timeout_s, max_queue,
--       tier_share, user_cap, now(optional), fair ("1", or "0" = FIFO within a tier),
--       session_key (or ""), prefix hashes (JSON list, shortest first), affinity_window_s,
--       seqs (batch rows the request takes: its n)
-- Returns {"ok", queued_len} or {reason, retry_after_s, detail}.
local rid, payload, user, tier = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local cost, weight, timeout = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local max_queue, share, user_cap = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])
local now = now_s(ARGV[12])
local fair = ARGV[13] ~= "0"
local session_key, hashes_json, window = ARGV[14] or "", ARGV[15] or "[]", tonumber(ARGV[16] or "0")
local seqs = tonumber(ARGV[17] or "1")

local len = num(redis.call("HGET", K_STATE, "len"), 0)
-- Already admitted: this is a client retry of a command whose reply was lost.
if redis.call("EXISTS", k_req(rid)) == 1 then return {"ok", len} end
local rate = num(redis.call("HGET", K_DRAIN, "rate"), 0)
local queued_cost = 0
for _, t in ipairs(TIERS) do queued_cost = queued_cost + num(redis.call("HGET", K_STATE, "cost:" .. t), 0) end
local avg_cost = (len > 0) and (queued_cost / len) or cost

-- seconds until `n` requests' worth of queued work has drained (1 s when unknown)
local function drain_time(units)
  if rate <= 0 then return 1 end
  return math.max(1, math.ceil(units / rate))
end

-- Lower tiers see a smaller share of the queue: under pressure they are shed first.
local limit = math.floor(max_queue * share)
if len >= limit then
  return {"queue_full", drain_time((len - limit + 1) * avg_cost), tostring(limit)}
end
local ucount = num(redis.call("HGET", K_UCOUNT, user), 0)
if ucount >= user_cap then
  return {"user_cap", drain_time(avg_cost), tostring(user_cap)}
end
-- Work that will run before this request: everything queued in its tier and above.
local ahead = 0
for _, t in ipairs(TIERS) do
  if RANK[t] >= RANK[tier] then ahead = ahead + num(redis.call("HGET", K_STATE, "cost:" .. t), 0) end
end
if rate > 0 and ahead / rate > timeout then
  return {"wait_exceeds_deadline", drain_time(ahead - rate * timeout), string.format("%.1f", ahead / rate)}
end

-- Start-time fair queueing: S = max(V_tier, F_user), F_user = S + cost / weight.
-- With fairness off (the benchmark baseline) the tag is the arrival time: plain FIFO.
local start = now
if fair then
  local v = num(redis.call("HGET", K_STATE, "v:" .. tier), 0)
  local f_user = num(redis.call("ZSCORE", k_fin(tier), user), 0)
  start = math.max(v, f_user)
  redis.call("ZADD", k_fin(tier), start + cost / weight, user)
end

redis.call("HSET", k_req(rid),
  "payload", payload, "user", user, "tier", tier, "cost", cost, "start", tostring(start),
  "enq", tostring(now), "deadline", tostring(now + timeout), "state", "queued", "attempts", 0, "seqs", seqs,
  "w", tostring(weight))

-- KV affinity: offer the request first to the live worker that holds the most of its
-- prompt's KV cache (its session, else the longest shared prefix).
local aff, aff_tokens = nil, 0
local function best_holder(key, min_tokens)
  local best, best_tokens = nil, min_tokens
  local f = redis.call("HGETALL", key)
  for i = 1, #f, 2 do
    local exp, tok = string.match(f[i + 1], "([^:]+):([^:]+)")
    if tonumber(exp) > now and tonumber(tok) > best_tokens then best, best_tokens = f[i], tonumber(tok) end
  end
  return best, best_tokens
end
if window > 0 then
  if session_key ~= "" then aff, aff_tokens = best_holder(P .. ":kvs:" .. session_key, 0) end
  local hashes = cjson.decode(hashes_json)
  for j = #hashes, 1, -1 do
    local w, tok = best_holder(P .. ":kvp:" .. hashes[j], aff_tokens)
    if w then aff, aff_tokens = w, tok break end
  end
  if aff then
    redis.call("HSET", k_req(rid), "aff", aff, "aff_until", tostring(now + window))
    redis.call("LPUSH", P .. ":bell:" .. aff, "1")
    redis.call("LTRIM", P .. ":bell:" .. aff, 0, 63)
    redis.call("EXPIRE", P .. ":bell:" .. aff, 60)
  end
end
insert_waiting(rid, tier, user, start, now, false)
ring_bell()
return {"ok", len + 1}
