-- Claim up to n requests for one worker: pick across tiers (with aging) and users
-- (start-time fair queueing), move each to in-flight with a lease.
-- ARGV: prefix, worker, n, lease_s, aging_max_wait_s, now(optional)
-- Returns {claimed, expired}: claimed = flat {rid, payload, attempts, ...},
-- expired = flat {rid, payload, ...} (deadline passed before start: never run late).
local worker, n, lease_s, max_wait = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local now = now_s(ARGV[6])
local claimed, expired = {}, {}
local backlogged = false
local claimed_cost = 0

while #claimed < 3 * n do
  -- Strict priority by tier (high 2 > normal 1 > low 0), except that a request which
  -- has waited `max_wait` seconds is overdue (level 3) and goes before all fresher
  -- work; among overdue tiers the longest wait goes first. A tier's head is its
  -- oldest request, so checking it is enough. (Python twin: scheduler.policy.)
  local best_tier, best_level, best_oldest, best_wait = nil, -1, nil, -1
  local top_rank = -1  -- highest tier with any waiting work
  for _, t in ipairs(TIERS) do
    local head = redis.call("ZRANGE", k_age(t), 0, 0, "WITHSCORES")
    if head[1] then
      if RANK[t] > top_rank then top_rank = RANK[t] end
      local wait = now - tonumber(head[2])
      local level = (wait >= max_wait) and 3 or RANK[t]
      if level > best_level or (level == 3 and best_level == 3 and wait > best_wait) then
        best_tier, best_level, best_oldest, best_wait = t, level, head[1], wait
      end
    end
  end
  if not best_tier then break end

  local rid
  if best_level == 3 and top_rank > RANK[best_tier] then
    rid = best_oldest  -- overdue, overtaking a higher tier: its oldest request goes now
  else
    local u = redis.call("ZRANGE", k_tu(best_tier), 0, 0)[1]
    rid = redis.call("LINDEX", k_uq(best_tier, u), 0)
  end
  local rk = k_req(rid)
  local f = redis.call("HMGET", rk, "payload", "user", "start", "deadline", "attempts", "cost", "started")
  remove_waiting(rid, best_tier, f[2])
  local start = num(f[3], 0)
  if start > num(redis.call("HGET", K_STATE, "v:" .. best_tier), 0) then
    redis.call("HSET", K_STATE, "v:" .. best_tier, tostring(start))
  end

  if f[7] ~= "1" and num(f[4], now + 1) < now then
    table.insert(expired, rid)
    table.insert(expired, f[1])
    redis.call("DEL", rk)
  elseif #claimed < 3 * n then
    local attempts = redis.call("HINCRBY", rk, "attempts", 1)
    redis.call("HSET", rk, "state", "running", "worker", worker, "started", "1", "claimed", tostring(now))
    redis.call("ZADD", K_LEASES, now + lease_s, rid)
    table.insert(claimed, rid)
    table.insert(claimed, f[1])
    table.insert(claimed, attempts)
    claimed_cost = claimed_cost + num(f[6], 0)
  end
  if #claimed >= 3 * n then
    backlogged = num(redis.call("HGET", K_STATE, "len"), 0) > 0
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
