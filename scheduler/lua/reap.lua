-- Requeue requests whose worker is gone: it has been silent (no claim, no lease
-- renewal) for dead_s, a few missed heartbeats, or their lease lapsed (the backstop:
-- a worker that lives but no longer renews a request). They go back to the head of
-- their user's queue with their original start tag and enqueue time, so they run next.
-- ARGV: prefix, max_attempts, now(optional), dead_s (0 = leases only)
-- Returns {requeued_rids, failed = flat {rid, payload}} (out of attempts; a claim that
-- ended in a preemption is not a failed attempt).
local max_attempts = tonumber(ARGV[2])
local now = now_s(ARGV[3])
local dead_s = tonumber(ARGV[4] or "0") or 0
local requeued, failed, back = {}, {}, {}

local dead, any_dead = {}, false
if dead_s > 0 then
  local heard = redis.call("HGETALL", K_ALIVE)
  for i = 1, #heard, 2 do
    if now - tonumber(heard[i + 1]) > dead_s then dead[heard[i]] = true any_dead = true end
  end
end
-- Usually nobody is dead: look at lapsed leases only. Otherwise at every lease.
local MAX_SCAN = 1024
local leased
if any_dead then
  leased = redis.call("ZRANGE", K_LEASES, 0, MAX_SCAN - 1, "WITHSCORES")
else
  leased = redis.call("ZRANGEBYSCORE", K_LEASES, "-inf", now, "WITHSCORES", "LIMIT", 0, 256)
end
for i = 1, #leased, 2 do
  local rid, expiry = leased[i], tonumber(leased[i + 1])
  local rk = k_req(rid)
  local f = redis.call("HMGET", rk, "payload", "start", "enq", "cancelled", "worker")
  if expiry <= now or not f[1] or (f[5] and dead[f[5]]) then
    redis.call("ZREM", K_LEASES, rid)
    if not f[1] then
      -- already completed
    elseif f[4] == "1" then
      redis.call("DEL", rk, k_out(rid))
    elseif failed_attempts(rk) >= max_attempts then
      table.insert(failed, rid)
      table.insert(failed, f[1])
      redis.call("DEL", rk)
      redis.call("EXPIRE", k_out(rid), 60)
    else
      table.insert(back, {rid, num(f[2], 0), num(f[3], now)})
    end
  end
end
-- Each goes to the head of its user's queue: the latest first, so they keep their order.
table.sort(back, function(a, b) if a[2] ~= b[2] then return a[2] > b[2] end return a[3] > b[3] end)
for _, r in ipairs(back) do
  requeue_front(r[1], now)
  table.insert(requeued, 1, r[1])
end
-- Whatever the dead held is requeued now: forget them (a worker that was only slow
-- is heard from again at its next claim or renewal, and drops what it lost).
if any_dead and #leased < 2 * MAX_SCAN then
  for w in pairs(dead) do redis.call("HDEL", K_ALIVE, w) end
end
if #requeued > 0 then ring_bell() end
return {requeued, failed}
