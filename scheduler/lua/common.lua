-- Shared helpers, prepended to every script. Every key lives under the model's hash
-- tag (ARGV[1] = "is:{model}"), so a script touches one Cluster slot.
local P = ARGV[1]
local TIERS = {"high", "normal", "low"}
local RANK = {high = 2, normal = 1, low = 0}

local function now_s(arg)
  if arg and arg ~= "" then return tonumber(arg) end
  local t = redis.call("TIME")
  return tonumber(t[1]) + tonumber(t[2]) / 1e6
end

local function k_req(rid) return P .. ":req:" .. rid end
local function k_uq(tier, user) return P .. ":uq:" .. tier .. ":" .. user end
local function k_tu(tier) return P .. ":tu:" .. tier end
local function k_age(tier) return P .. ":age:" .. tier end
local function k_fin(tier) return P .. ":fin:" .. tier end
local function k_out(rid) return P .. ":out:" .. rid end
local K_STATE = P .. ":state"
local K_UCOUNT = P .. ":ucount"
local K_LEASES = P .. ":leases"
local K_ALIVE = P .. ":alive"
local K_DRAIN = P .. ":drain"
local K_BELL = P .. ":bell"

local function num(v, default)
  if v == false or v == nil then return default end
  return tonumber(v) or default
end

-- Put a request (already described by its hash) into the waiting structures.
-- `front` = true puts it at the head of its user's queue (a requeued lease).
local function insert_waiting(rid, tier, user, start, enq, front)
  local uq = k_uq(tier, user)
  if front then redis.call("LPUSH", uq, rid) else redis.call("RPUSH", uq, rid) end
  local head = redis.call("LINDEX", uq, 0)
  local head_start = (head == rid) and start or num(redis.call("HGET", k_req(head), "start"), 0)
  redis.call("ZADD", k_tu(tier), head_start, user)
  redis.call("ZADD", k_age(tier), enq, rid)
  redis.call("HINCRBY", K_STATE, "len", 1)
  redis.call("HINCRBY", K_STATE, "len:" .. tier, 1)
  redis.call("HINCRBYFLOAT", K_STATE, "cost:" .. tier, redis.call("HGET", k_req(rid), "cost"))
  redis.call("HINCRBY", K_UCOUNT, user, 1)
end

-- Take a waiting request out of the waiting structures (it is being claimed or cancelled).
local function remove_waiting(rid, tier, user)
  local uq = k_uq(tier, user)
  redis.call("LREM", uq, 1, rid)
  local head = redis.call("LINDEX", uq, 0)
  if head then
    redis.call("ZADD", k_tu(tier), num(redis.call("HGET", k_req(head), "start"), 0), user)
  else
    redis.call("ZREM", k_tu(tier), user)
  end
  redis.call("ZREM", k_age(tier), rid)
  redis.call("HINCRBY", K_STATE, "len", -1)
  if redis.call("HINCRBY", K_STATE, "len:" .. tier, -1) <= 0 then
    -- The tier's busy period ends (start-time fair queueing): the virtual time moves to
    -- the largest finish tag, so every user's tag means the same as none: drop them all.
    local last = redis.call("ZRANGE", k_fin(tier), -1, -1, "WITHSCORES")
    if last[2] and tonumber(last[2]) > num(redis.call("HGET", K_STATE, "v:" .. tier), 0) then
      redis.call("HSET", K_STATE, "v:" .. tier, last[2])
    end
    redis.call("DEL", k_fin(tier))
  end
  redis.call("HINCRBYFLOAT", K_STATE, "cost:" .. tier, -num(redis.call("HGET", k_req(rid), "cost"), 0))
  if redis.call("HINCRBY", K_UCOUNT, user, -1) <= 0 then redis.call("HDEL", K_UCOUNT, user) end
end

-- Reserved for another worker (KV affinity) within its window?
local function eligible(rid, worker, now)
  local a = redis.call("HMGET", k_req(rid), "aff", "aff_until")
  return not a[1] or a[1] == worker or tonumber(a[2]) <= now
end

-- Move one waiting request to in-flight for `worker`. Returns its claim entry
-- {rid, payload, attempts, weight, preemptions, preempted_ms, preempted_at} and its
-- cost; or nil and its payload when its start deadline has passed (it never runs late).
local function take(rid, tier, worker, lease_s, now)
  local rk = k_req(rid)
  local f = redis.call("HMGET", rk, "payload", "user", "start", "deadline", "attempts", "cost", "started", "w",
    "preemptions", "preempted_ms", "preempted_at")
  remove_waiting(rid, tier, f[2])
  local start = num(f[3], 0)
  if start > num(redis.call("HGET", K_STATE, "v:" .. tier), 0) then
    redis.call("HSET", K_STATE, "v:" .. tier, tostring(start))
    -- finish tags the virtual time has passed mean the same as none
    redis.call("ZREMRANGEBYSCORE", k_fin(tier), "-inf", start)
  end
  if f[7] ~= "1" and num(f[4], now + 1) < now then
    redis.call("DEL", rk)
    return nil, f[1]
  end
  local attempts = redis.call("HINCRBY", rk, "attempts", 1)
  local preempted_ms = num(f[10], 0)
  if f[11] then  -- back from a preemption: count the time it spent waiting again
    preempted_ms = preempted_ms + math.floor((now - tonumber(f[11])) * 1000 + 0.5)
    redis.call("HSET", rk, "preempted_ms", preempted_ms)
    redis.call("HDEL", rk, "preempted_at")
  end
  redis.call("HSET", rk, "state", "running", "worker", worker, "started", "1", "claimed", tostring(now))
  redis.call("ZADD", K_LEASES, now + lease_s, rid)
  redis.call("HSET", K_ALIVE, worker, tostring(now))  -- a claim is a sign of life (lua/reap.lua)
  return {rid, f[1], attempts, f[8] or "1", num(f[9], 0), preempted_ms, f[11] or "0"}, num(f[6], 0)
end

-- Claims that failed: every claim except those that ended in a preemption or a drain.
local function failed_attempts(rk)
  local f = redis.call("HMGET", rk, "attempts", "preemptions", "drains")
  return num(f[1], 0) - num(f[2], 0) - num(f[3], 0)
end

-- A running request goes back to the head of its user's queue with its original start
-- tag and enqueue time, so it goes next (a lapsed lease, a preemption, a failed worker).
local function requeue_front(rid, now)
  local rk = k_req(rid)
  local f = redis.call("HMGET", rk, "user", "tier", "start", "enq")
  redis.call("HSET", rk, "state", "queued")
  redis.call("HDEL", rk, "worker")
  insert_waiting(rid, f[2], f[1], num(f[3], 0), num(f[4], now), true)
end

local function ring_bell()
  redis.call("LPUSH", K_BELL, "1")
  redis.call("LTRIM", K_BELL, 0, 63)
end

-- The preemption rule (twin: scheduler.policy.pick_victims). `batch` =
-- {slots = rows, running = {{rid, user, rank, weight, seqs, work, steps}, ...}}.
-- Returns the victims (running entries) a newcomer of `user`/`rank` needing `need`
-- rows may preempt and the reason ("tier" or "share"); {} when there is room; nil
-- when it does not qualify.
local function pick_victims(batch, user, rank, weight, need, min_run)
  local free = batch.slots
  local rows, weights, names = {}, {}, {}
  for _, r in ipairs(batch.running) do
    local u = r[2]
    free = free - r[5]
    if rows[u] == nil then
      rows[u], weights[u] = 0, 0
      table.insert(names, u)
    end
    rows[u] = rows[u] + r[5]
    if r[4] > weights[u] then weights[u] = r[4] end
  end
  if free >= need then return {}, "" end
  if weights[user] == nil then
    weights[user] = 0
    table.insert(names, user)
  end
  if weight > weights[user] then weights[user] = weight end
  table.sort(names)
  local total = 0
  for _, u in ipairs(names) do total = total + weights[u] end
  local function share(u) return batch.slots * weights[u] / total end
  local under = (rows[user] or 0) + need <= share(user)
  local pool, taken = {}, {}
  for _, r in ipairs(batch.running) do
    if r[2] ~= user and r[7] >= min_run and r[3] <= rank then table.insert(pool, r) end
  end
  local victims = {}
  while free < need do
    local best, bk = nil, nil
    for i, r in ipairs(pool) do
      if not taken[i] and (r[3] < rank or (under and rows[r[2]] - r[5] >= share(r[2]))) then
        local k = {r[3], -(rows[r[2]] - share(r[2])), r[6], r[1]}
        local better = best == nil
        if not better then
          for j = 1, 4 do
            if k[j] ~= bk[j] then better = k[j] < bk[j] break end
          end
        end
        if better then best, bk = i, k end
      end
    end
    if best == nil then return nil end
    local v = pool[best]
    taken[best] = true
    table.insert(victims, v)
    rows[v[2]] = rows[v[2]] - v[5]
    free = free + v[5]
  end
  return victims, (victims[1][3] < rank) and "tier" or "share"
end
