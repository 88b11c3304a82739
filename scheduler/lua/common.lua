-- Shared helpers, after the prelude rendered from scheduler/keys.py (keys, channels,
-- state fields, tiers) and before each script. Every key is under the model's hash
-- tag, so a script touches one Cluster slot.

local function now_s(arg)
  if arg and arg ~= "" then return tonumber(arg) end
  local t = redis.call("TIME")
  return tonumber(t[1]) + tonumber(t[2]) / 1e6
end

local function num(v, default)
  if v == false or v == nil then return default end
  return tonumber(v) or default
end

-- Requests waiting: in one tier, or in all of them (no tier).
local function waiting(tier)
  return num(redis.call("HGET", K_STATE, tier and f_waiting_tier(tier) or F_WAITING), 0)
end

-- Ring a doorbell list (BLPOP wakes one waiting worker); a few rings are kept for
-- workers that are busy claiming right now.
local function ring(bell, ttl_s)
  redis.call("LPUSH", bell, "1")
  redis.call("LTRIM", bell, 0, 63)
  if ttl_s then redis.call("EXPIRE", bell, ttl_s) end
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
  redis.call("HINCRBY", K_STATE, F_WAITING, 1)
  redis.call("HINCRBY", K_STATE, f_waiting_tier(tier), 1)
  redis.call("HINCRBYFLOAT", K_STATE, f_cost_tier(tier), redis.call("HGET", k_req(rid), "cost"))
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
  redis.call("HINCRBY", K_STATE, F_WAITING, -1)
  if redis.call("HINCRBY", K_STATE, f_waiting_tier(tier), -1) <= 0 then
    -- The tier's busy period ends (start-time fair queueing): the virtual time moves to
    -- the largest finish tag, so every user's tag means the same as none: drop them all.
    local last = redis.call("ZRANGE", k_fin(tier), -1, -1, "WITHSCORES")
    if last[2] and tonumber(last[2]) > num(redis.call("HGET", K_STATE, f_vtime(tier)), 0) then
      redis.call("HSET", K_STATE, f_vtime(tier), last[2])
    end
    redis.call("DEL", k_fin(tier))
  end
  redis.call("HINCRBYFLOAT", K_STATE, f_cost_tier(tier), -num(redis.call("HGET", k_req(rid), "cost"), 0))
  if redis.call("HINCRBY", K_UCOUNT, user, -1) <= 0 then redis.call("HDEL", K_UCOUNT, user) end
end
