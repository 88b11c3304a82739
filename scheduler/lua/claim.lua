-- Claim up to n requests for one worker: pick across tiers (with aging) and users
-- (start-time fair queueing), move each to in-flight with a lease.
-- ARGV: prefix, worker, n, lease_s, aging_max_wait_s, now(optional)
-- Returns {claimed, expired}: claimed = flat {rid, payload, attempts, ...},
-- expired = flat {rid, payload, ...} (deadline passed before start: never run late).
local worker, n, lease_s, max_wait = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local now = now_s(ARGV[6])
local claimed, expired = {}, {}
local blocked = {}  -- tiers whose candidates are all reserved for other workers
local SCAN_USERS, SCAN_DEPTH = 16, 4
local backlogged = false
local claimed_cost = 0

-- Move one waiting request to in-flight for this worker (or expire it: a request
-- whose start deadline has passed never runs late).
local function take(rid, tier)
  redis.call("HSET", K_STATE, "served:" .. tier, tostring(now))
  local rk = k_req(rid)
  local f = redis.call("HMGET", rk, "payload", "user", "start", "deadline", "attempts", "cost", "started")
  remove_waiting(rid, tier, f[2])
  local start = num(f[3], 0)
  if start > num(redis.call("HGET", K_STATE, "v:" .. tier), 0) then
    redis.call("HSET", K_STATE, "v:" .. tier, tostring(start))
  end
  if f[7] ~= "1" and num(f[4], now + 1) < now then
    table.insert(expired, rid)
    table.insert(expired, f[1])
    redis.call("DEL", rk)
    return
  end
  local attempts = redis.call("HINCRBY", rk, "attempts", 1)
  redis.call("HSET", rk, "state", "running", "worker", worker, "started", "1", "claimed", tostring(now))
  redis.call("ZADD", K_LEASES, now + lease_s, rid)
  table.insert(claimed, rid)
  table.insert(claimed, f[1])
  table.insert(claimed, attempts)
  claimed_cost = claimed_cost + num(f[6], 0)
end

while #claimed < 3 * n do
  -- Strict priority by tier (high 2 > normal 1 > low 0), except that a tier which
  -- has had waiting work but no claim for `max_wait` seconds is starved (level 3)
  -- and goes next; among starved tiers the longest-starved first. So every tier
  -- with work is served at least once per `max_wait`, while a tier that is merely
  -- busy (served, but backlogged) never outranks higher tiers. (Twin: scheduler.policy.)
  local best_tier, best_level, best_starved = nil, -1, -1
  for _, t in ipairs(TIERS) do
    local head = (not blocked[t]) and redis.call("ZRANGE", k_age(t), 0, 0, "WITHSCORES") or {}
    if head[1] then
      local since = math.max(tonumber(head[2]), num(redis.call("HGET", K_STATE, "served:" .. t), 0))
      local starved = now - since
      local level = (starved >= max_wait) and 3 or RANK[t]
      if level > best_level or (level == 3 and best_level == 3 and starved > best_starved) then
        best_tier, best_level, best_starved = t, level, starved
      end
    end
  end
  if not best_tier then break end

  -- The fair head, unless it is reserved for another worker (KV affinity, for a short
  -- window): then the user's next request, then the next user's.
  local rid = nil
  for _, u in ipairs(redis.call("ZRANGE", k_tu(best_tier), 0, SCAN_USERS - 1)) do
    for _, cand in ipairs(redis.call("LRANGE", k_uq(best_tier, u), 0, SCAN_DEPTH - 1)) do
      local a = redis.call("HMGET", k_req(cand), "aff", "aff_until")
      if not a[1] or a[1] == worker or tonumber(a[2]) <= now then rid = cand break end
    end
    if rid then break end
  end
  if rid then take(rid, best_tier) else blocked[best_tier] = true end
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
