-- Ship one engine step's events bound for one API process: append each to its
-- request's output log (a resumed request or a reconnecting client replays it), then
-- publish them all as one batch on the process's reply channel.
-- Fenced by lease owner: events of a request this worker no longer owns (the reaper
-- gave it to another worker, it was released, or a restarted Redis lost it) are
-- dropped and their ids returned, so the worker stops them and no two workers ever
-- write one request's log.
-- ARGV: prefix, worker, channel, log_ttl_s, then repeated (rid, mode, encoded event):
--   "owned": fenced, logged (token events; an engine's own error events)
--   "live":  fenced, not logged (speech audio chunks)
--   "final": not fenced, logged and set to expire (an error for a request the
--            scheduler has already ended: its deadline passed, or out of attempts)
-- Returns the ids whose events were dropped, each once.
local worker, channel, ttl = ARGV[2], ARGV[3], tonumber(ARGV[4])
local out, lost, owned = {}, {}, {}
for i = 5, #ARGV, 3 do
  local rid, mode, ev = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local ok = true
  if mode ~= "final" then
    if owned[rid] == nil then
      owned[rid] = redis.call("HGET", k_req(rid), "worker") == worker
      if not owned[rid] then table.insert(lost, rid) end
    end
    ok = owned[rid]
  end
  if ok then
    if mode ~= "live" then
      local log = k_out(rid)
      redis.call("RPUSH", log, ev)
      if mode == "final" then redis.call("EXPIRE", log, ttl) end
    end
    table.insert(out, ev)
  end
end
if #out > 0 then redis.call("PUBLISH", channel, "[" .. table.concat(out, ",") .. "]") end
return lost
