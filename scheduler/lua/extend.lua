-- Heartbeat: extend this worker's leases. ARGV: prefix, worker, lease_s, now, rid...
-- Returns the rids this worker no longer owns or that were cancelled (drop them).
local worker, lease_s = ARGV[2], tonumber(ARGV[3])
local now = now_s(ARGV[4])
redis.call("HSET", K_ALIVE, worker, tostring(now))  -- heard from: the reaper's liveness signal
local lost = {}
for i = 5, #ARGV do
  local rid = ARGV[i]
  local f = redis.call("HMGET", k_req(rid), "worker", "state", "cancelled")
  if f[1] == worker and f[2] == "running" and f[3] ~= "1" then
    redis.call("ZADD", K_LEASES, "XX", now + lease_s, rid)
  else
    table.insert(lost, rid)
  end
end
return lost
