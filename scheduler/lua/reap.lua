-- Requeue requests whose lease expired (their worker died or hung), at the head of
-- their user's queue with their original start tag and enqueue time, so they go next.
-- ARGV: max_attempts, now(optional), log_ttl_s (how long the log of a request that
-- failed stays readable)
-- Returns {requeued_rids, failed = flat {rid, payload}} (out of attempts; a claim that
-- ended in a preemption is not a failed attempt).
local max_attempts = tonumber(ARGV[1])
local now = now_s(ARGV[2])
local log_ttl = tonumber(ARGV[3])
local requeued, failed = {}, {}
local due = redis.call("ZRANGEBYSCORE", K_LEASES, "-inf", now, "LIMIT", 0, 256)
for _, rid in ipairs(due) do
  redis.call("ZREM", K_LEASES, rid)
  local rk = k_req(rid)
  local f = redis.call("HMGET", rk, "payload", "cancelled")
  if not f[1] then
    -- already completed
  elseif f[2] == "1" then
    redis.call("DEL", rk, k_out(rid))
  elseif failed_attempts(rk) >= max_attempts then
    table.insert(failed, rid)
    table.insert(failed, f[1])
    redis.call("DEL", rk)
    redis.call("EXPIRE", k_out(rid), log_ttl)
  else
    requeue_front(rid, now)
    table.insert(requeued, rid)
  end
end
if #requeued > 0 then ring(K_BELL) end
return {requeued, failed}
