-- A worker gives up running requests it holds (its tensor-parallel group broke, or it
-- is stopping with work left): their leases lapse now, so the next reaper pass requeues
-- them at the head of their users' queues, and whoever claims them resumes from the
-- output log. Counted as a failed attempt, like a crash.
-- ARGV: prefix, worker, rid...   Returns how many it released.
local worker = ARGV[2]
local n = 0
for i = 3, #ARGV do
  local rid = ARGV[i]
  if redis.call("HGET", k_req(rid), "worker") == worker then
    redis.call("ZADD", K_LEASES, "XX", 0, rid)
    n = n + 1
  end
end
return n
