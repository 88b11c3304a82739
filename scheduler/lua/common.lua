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
local K_STATE = P .. ":state"
local K_UCOUNT = P .. ":ucount"
local K_LEASES = P .. ":leases"
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

-- A running request leaves its worker (lapsed lease, or handed back): back to the head
-- of its user's queue with its original tags and its output log, so whoever claims it
-- next resumes it; dropped if it was cancelled; failed if `count_attempt` and it is out
-- of attempts. Appends to `requeued` (rid) or `failed` (rid, payload).
local function leave_worker(rid, max_attempts, count_attempt, now, requeued, failed)
  local rk = k_req(rid)
  local f = redis.call("HMGET", rk, "payload", "user", "tier", "start", "enq", "attempts", "cancelled")
  redis.call("ZREM", K_LEASES, rid)
  if not f[1] then
    -- already completed
  elseif f[7] == "1" then
    redis.call("DEL", rk, P .. ":out:" .. rid)
  elseif count_attempt and num(f[6], 0) >= max_attempts then
    table.insert(failed, rid)
    table.insert(failed, f[1])
    redis.call("DEL", rk)
    redis.call("EXPIRE", P .. ":out:" .. rid, 60)
  else
    redis.call("HSET", rk, "state", "queued")
    redis.call("HDEL", rk, "worker")
    insert_waiting(rid, f[3], f[2], num(f[4], 0), num(f[5], now), true)
    table.insert(requeued, rid)
  end
end

local function ring_bell()
  redis.call("LPUSH", K_BELL, "1")
  redis.call("LTRIM", K_BELL, 0, 63)
end
