-- A worker's batch is full: claim the waiting requests that may preempt part of it,
-- each with the running requests it displaces (the rule: `pick_victims`). Tiers high to
-- low, users in fair order (start tags), each user's head request only; the batch
-- summary is updated after each claim, so one call never plans a row twice.
-- (Python twin: scheduler.policy.FairQueueModel.claim_preempting.)
-- ARGV: worker, lease_s, batch (JSON {"slots": rows, "running": [[rid, user,
--       rank, weight, seqs, work, steps], ...]}), min_run_steps, now(optional)
-- Returns {claimed, expired}: claimed = {{<take's entry>..., reason, victim rid...}, ...},
-- expired = {payload, ...}.
local worker, lease_s = ARGV[1], tonumber(ARGV[2])
local batch = cjson.decode(ARGV[3])
local min_run = tonumber(ARGV[4])
local now = now_s(ARGV[5])
local claimed, expired = {}, {}
local SCAN_USERS = 64  -- scheduler.policy.PREEMPT_SCAN_USERS
if waiting() == 0 then return {claimed, expired} end

while true do
  local pick = nil
  for _, t in ipairs(TIERS) do
    for _, u in ipairs(redis.call("ZRANGE", k_tu(t), 0, SCAN_USERS - 1)) do
      local rid = redis.call("LINDEX", k_uq(t, u), 0)
      if rid and eligible(rid, worker, now) then
        local f = redis.call("HMGET", k_req(rid), "w", "seqs")
        local weight, need = num(f[1], 1), num(f[2], 1)
        local victims, reason = pick_victims(batch, u, RANK[t], weight, need, min_run)
        if victims and #victims > 0 then
          pick = {rid = rid, tier = t, user = u, weight = weight, need = need, victims = victims, reason = reason}
          break
        end
      end
    end
    if pick then break end
  end
  if not pick then break end
  local entry, cost = take(pick.rid, pick.tier, worker, lease_s, now)
  if entry then
    table.insert(entry, pick.reason)
    local gone = {}
    for _, v in ipairs(pick.victims) do
      table.insert(entry, v[1])
      gone[v[1]] = true
    end
    table.insert(claimed, entry)
    local running = {}
    for _, r in ipairs(batch.running) do
      if not gone[r[1]] then table.insert(running, r) end
    end
    table.insert(running, {pick.rid, pick.user, RANK[pick.tier], pick.weight, pick.need, 0, 0})
    batch.running = running
  else
    table.insert(expired, cost)
  end
end
return {claimed, expired}
