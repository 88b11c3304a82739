-- Requeue requests whose worker is gone: it has been silent (no claim, no lease
-- renewal) for dead_s, a few missed heartbeats, or their lease lapsed (the backstop:
-- a worker that lives but no longer renews a request). They go back to the head of
-- their user's queue with their original start tag and enqueue time, so they run next.
-- ARGV: prefix, max_attempts, now(optional), dead_s (0 = leases only)
-- Returns {requeued_rids, failed = flat {rid, payload}} (out of attempts).
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
  local f = redis.call("HMGET", rk, "payload", "user", "tier", "start", "enq", "attempts", "cancelled", "worker")
  if expiry <= now or not f[1] or (f[8] and dead[f[8]]) then
    redis.call("ZREM", K_LEASES, rid)
    if not f[1] then
      -- already completed
    elseif f[7] == "1" then
      redis.call("DEL", rk, P .. ":out:" .. rid)
    elseif num(f[6], 0) >= max_attempts then
      table.insert(failed, rid)
      table.insert(failed, f[1])
      redis.call("DEL", rk)
      redis.call("EXPIRE", P .. ":out:" .. rid, 60)
    else
      table.insert(back, {rid, f[3], f[2], num(f[4], 0), num(f[5], now)})
    end
  end
end
-- Each goes to the head of its user's queue: the latest first, so they keep their order.
table.sort(back, function(a, b) if a[4] ~= b[4] then return a[4] > b[4] end return a[5] > b[5] end)
for _, r in ipairs(back) do
  redis.call("HSET", k_req(r[1]), "state", "queued")
  redis.call("HDEL", k_req(r[1]), "worker")
  insert_waiting(r[1], r[2], r[3], r[4], r[5], true)
  table.insert(requeued, 1, r[1])
end
-- Whatever the dead held is requeued now: forget them (a worker that was only slow
-- is heard from again at its next claim or renewal, and drops what it lost).
if any_dead and #leased < 2 * MAX_SCAN then
  for w in pairs(dead) do redis.call("HDEL", K_ALIVE, w) end
end
if #requeued > 0 then
  redis.call("LPUSH", K_BELL, "1")
  redis.call("LTRIM", K_BELL, 0, 63)
end
return {requeued, failed}
