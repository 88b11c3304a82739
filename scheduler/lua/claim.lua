-- Claim requests for one worker until they bring n sequences (batch rows: a request
-- with n choices brings n): pick across tiers (with aging) and users (start-time fair
-- queueing), move each to in-flight with a lease. The next request in policy order
-- that would overshoot n ends the claim, unless nothing was claimed yet (so a request
-- wider than the free room still runs once it is first in line).
-- ARGV: worker, n, lease_s, aging_max_wait_s, now(optional)
-- Returns {claimed, expired}: claimed = {{rid, payload, attempts, weight, preemptions,
-- preempted_ms, preempted_at}, ...} (see `take`), expired = {payload, ...} (deadline
-- passed before start: never run late).
local worker, n, lease_s, max_wait = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local now = now_s(ARGV[5])
local claimed, expired = {}, {}
local blocked = {}  -- tiers whose candidates are all reserved for other workers
local SCAN_USERS, SCAN_DEPTH = 16, 4
local backlogged = false
local claimed_cost = 0
local taken = 0  -- sequences claimed

while taken < n do
  -- Strict priority by tier (high 2 > normal 1 > low 0), with aging: a request of a
  -- lower tier than the top waiting one that has waited `max_wait` seconds is overdue,
  -- and overdue requests (oldest first) take every other claim while they last. So
  -- a low request starts within about the bound under sustained high load, and a
  -- merely busy lower tier can never take more than half the slots from higher work.
  -- Within a tier, start-time fair queueing. (Python twin: scheduler.policy.)
  local heads, top_rank = {}, -1
  for _, t in ipairs(TIERS) do
    if not blocked[t] then
      local head = redis.call("ZRANGE", k_age(t), 0, 0, "WITHSCORES")
      if head[1] then
        heads[t] = {head[1], now - tonumber(head[2])}
        if RANK[t] > top_rank then top_rank = RANK[t] end
      end
    end
  end
  if top_rank < 0 then break end
  local od_tier, od_wait = nil, -1
  for _, t in ipairs(TIERS) do
    local h = heads[t]
    if h and RANK[t] < top_rank and h[2] >= max_wait and h[2] > od_wait then od_tier, od_wait = t, h[2] end
  end
  local rid, best_tier, overdue = nil, nil, false
  if od_tier and redis.call("HGET", K_STATE, F_LAST_OVERDUE) ~= "1" and eligible(heads[od_tier][1], worker, now) then
    best_tier, rid, overdue = od_tier, heads[od_tier][1], true
  else
    for _, t in ipairs(TIERS) do
      if heads[t] and RANK[t] == top_rank then best_tier = t end
    end
    -- The fair head, unless it is reserved for another worker (KV affinity, for a short
    -- window): then the user's next request, then the next user's.
    for _, u in ipairs(redis.call("ZRANGE", k_tu(best_tier), 0, SCAN_USERS - 1)) do
      for _, cand in ipairs(redis.call("LRANGE", k_uq(best_tier, u), 0, SCAN_DEPTH - 1)) do
        if eligible(cand, worker, now) then rid = cand break end
      end
      if rid then break end
    end
  end
  local full = false
  if rid then
    local seqs = num(redis.call("HGET", k_req(rid), "seqs"), 1)
    full = taken > 0 and taken + seqs > n
    if not full then
      redis.call("HSET", K_STATE, F_LAST_OVERDUE, overdue and "1" or "0")
      local entry, cost = take(rid, best_tier, worker, lease_s, now)
      if entry then
        table.insert(claimed, entry)
        claimed_cost = claimed_cost + cost
        taken = taken + seqs
      else
        table.insert(expired, cost)
      end
    end
  else
    blocked[best_tier] = true
  end
  if full or taken >= n then
    backlogged = waiting() > 0
    break
  end
end

-- Drain rate (cost units per second), measured only while a backlog remains, when
-- claims are limited by worker capacity rather than by arrivals.
if claimed_cost > 0 then
  local d = redis.call("HMGET", K_DRAIN, "t0", "acc", "rate")
  local t0, acc, rate = num(d[1], now), num(d[2], 0) + claimed_cost, num(d[3], 0)
  if backlogged then
    if now - t0 >= 1 then
      local inst = acc / (now - t0)
      rate = (rate > 0) and (0.7 * rate + 0.3 * inst) or inst
      redis.call("HSET", K_DRAIN, "t0", tostring(now), "acc", 0, "rate", tostring(rate))
    else
      redis.call("HSET", K_DRAIN, "t0", tostring(t0), "acc", tostring(acc))
    end
  else
    redis.call("HSET", K_DRAIN, "t0", tostring(now), "acc", 0)
  end
end
return {claimed, expired}
