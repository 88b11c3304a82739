-- Heartbeat: extend this worker's leases. ARGV: worker, lease_s, now, rid...
-- Returns the rids this worker no longer owns or that were cancelled (drop them).
local worker, lease_s = ARGV[1], tonumber(ARGV[2])
local now = now_s(ARGV[3])
redis.call("HSET", K_ALIVE, worker, tostring(now))  -- heard from: the reaper's liveness signal
local lost = {}
for i = 4, #ARGV do
  local rid = ARGV[i]
  local f = redis.call("HMGET", k_req(rid), "worker", "state", "cancelled")
  if f[1] == worker and f[2] == "running" and f[3] ~= "1" then
    redis.call("ZADD", K_LEASES, "XX", now + lease_s, rid)
  else
    table.insert(lost, rid)
  end
end
return lost
