-- Requeue requests whose lease expired (their worker died or hung), at the head of
-- their user's queue with their original start tag and enqueue time, so they go next.
-- ARGV: prefix, max_attempts, now(optional)
-- Returns {requeued_rids, failed = flat {rid, payload}} (out of attempts).
local max_attempts = tonumber(ARGV[2])
local now = now_s(ARGV[3])
local requeued, failed = {}, {}
for _, rid in ipairs(redis.call("ZRANGEBYSCORE", K_LEASES, "-inf", now, "LIMIT", 0, 256)) do
  leave_worker(rid, max_attempts, true, now, requeued, failed)
end
if #requeued > 0 then ring_bell() end
return {requeued, failed}
