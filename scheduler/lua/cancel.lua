-- Cancel a request. ARGV: rid
-- Returns "dequeued" (it never ran), "running" (flagged and announced on the model's
-- cancel channel; its worker drops it at its next step) or "gone" (finished or unknown).
local rid = ARGV[1]
local rk = k_req(rid)
local f = redis.call("HMGET", rk, "state", "tier", "user")
if f[1] == "queued" then
  remove_waiting(rid, f[2], f[3])
  redis.call("DEL", rk, k_out(rid))
  return "dequeued"
elseif f[1] == "running" then
  redis.call("HSET", rk, "cancelled", "1")
  redis.call("SPUBLISH", C_CANCEL, rid)
  return "running"
end
return "gone"
