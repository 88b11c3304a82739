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
  local f = redis.call("HMGET", k_req(rid), "worker", "state")
  if f[1] == worker and f[2] == "running" then
    leave_worker(rid, max_attempts, kind == "failed", now, requeued, failed)
  end
end
if #requeued > 0 then ring_bell() end
return {requeued, failed}
