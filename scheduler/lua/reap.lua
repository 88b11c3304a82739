-- Requeue requests whose lease expired (their worker died or hung), at the head of
-- their user's queue with their original start tag and enqueue time, so they go next.
-- ARGV: prefix, max_attempts, now(optional)
-- Returns {requeued_rids, failed = flat {rid, payload}} (out of attempts).
local max_attempts = tonumber(ARGV[2])
local now = now_s(ARGV[3])
local requeued, failed = {}, {}
local due = redis.call("ZRANGEBYSCORE", K_LEASES, "-inf", now, "LIMIT", 0, 256)
for _, rid in ipairs(due) do
  redis.call("ZREM", K_LEASES, rid)
  local rk = k_req(rid)
  local f = redis.call("HMGET", rk, "payload", "user", "tier", "start", "enq", "attempts", "cancelled")
  if not f[1] then
    -- already completed
  elseif f[7] == "1" then
    redis.call("DEL", rk, P .. ":out:" .. rid)
  elseif num(f[6], 0) >= max_attempts then
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
if #requeued > 0 then
  redis.call("LPUSH", K_BELL, "1")
  redis.call("LTRIM", K_BELL, 0, 63)
end
return {requeued, failed}
