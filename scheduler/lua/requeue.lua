-- A worker hands a running request back to the queue, at the head of its user's queue
-- with its original tags, keeping its output log (whoever claims it next resumes from
-- there), and releases its lease, all at once.
-- ARGV: prefix, worker, rid, kind, max_attempts, now(optional)
-- kind "preempted": its rows went to another request; not a failed attempt.
-- kind "drained": its worker stopped with it unfinished (a drain that timed out, a host's
-- mode switch); not a failed attempt either.
-- kind "failed": the worker's step failed (out of memory, a device error, a broken
-- tensor-parallel group); a failed attempt: once the request is out of attempts it fails instead.
-- Returns "requeued", "failed" (the caller reports the error), "cancelled" (dropped:
-- the client is gone) or "gone" (not this worker's any more).
local worker, rid, kind, max_attempts = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local now = now_s(ARGV[6])
local rk = k_req(rid)
local f = redis.call("HMGET", rk, "worker", "state", "cancelled")
if f[1] ~= worker or f[2] ~= "running" then return "gone" end
redis.call("ZREM", K_LEASES, rid)
if f[3] == "1" then
  redis.call("DEL", rk, k_out(rid))
  return "cancelled"
end
if kind == "preempted" then
  redis.call("HINCRBY", rk, "preemptions", 1)
  redis.call("HSET", rk, "preempted_at", tostring(now))
elseif kind == "drained" then
  redis.call("HINCRBY", rk, "drains", 1)
elseif failed_attempts(rk) >= max_attempts then
  redis.call("DEL", rk)
  redis.call("EXPIRE", k_out(rid), 60)
  return "failed"
end
requeue_front(rid, now)
ring_bell()
return "requeued"
