-- A worker hands running requests back to the queue: it is stopping with work left
-- (a drain that timed out, a mode switch) or its tensor-parallel group broke. Each
-- goes to the head of its user's queue with its original tags and keeps its output
-- log, so whoever claims it next resumes where it stopped.
-- ARGV: prefix, worker, kind, max_attempts, rid...
-- kind "drained": not the request's failure; "failed": counts against max_attempts.
-- Returns {requeued_rids, failed = flat {rid, payload}} (out of attempts: the caller reports them).
local worker, kind, max_attempts = ARGV[2], ARGV[3], tonumber(ARGV[4])
local now = now_s("")
local requeued, failed = {}, {}
for i = 5, #ARGV do
  local rid = ARGV[i]
  local rk = k_req(rid)
  local f = redis.call("HMGET", rk, "worker", "state", "payload", "user", "tier", "start", "enq", "attempts",
                       "cancelled")
  if f[1] == worker and f[2] == "running" then
    redis.call("ZREM", K_LEASES, rid)
    if f[9] == "1" then
      redis.call("DEL", rk, P .. ":out:" .. rid)
    elseif kind == "failed" and num(f[8], 0) >= max_attempts then
      table.insert(failed, rid)
      table.insert(failed, f[3])
      redis.call("DEL", rk)
      redis.call("EXPIRE", P .. ":out:" .. rid, 60)
    else
      redis.call("HSET", rk, "state", "queued")
      redis.call("HDEL", rk, "worker")
      insert_waiting(rid, f[5], f[4], num(f[6], 0), num(f[7], now), true)
      table.insert(requeued, rid)
    end
  end
end
if #requeued > 0 then
  redis.call("LPUSH", K_BELL, "1")
  redis.call("LTRIM", K_BELL, 0, 63)
end
return {requeued, failed}
