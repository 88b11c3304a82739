-- A worker finished (or failed) a request. ARGV: worker, rid, log_ttl_s
-- Only the lease owner completes it; returns 1 if it did.
local worker, rid, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local rk = k_req(rid)
if redis.call("HGET", rk, "worker") ~= worker then return 0 end
redis.call("ZREM", K_LEASES, rid)
redis.call("DEL", rk)
redis.call("EXPIRE", k_out(rid), ttl)
return 1
