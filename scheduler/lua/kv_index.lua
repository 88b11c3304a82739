-- Keep the KV-cache routing index in step with one worker's DRAM store.
-- ARGV: worker, ttl_s, now(optional), then repeated (op, kind, key, tokens):
--   op: "put" (this worker now holds it), "del" (evicted), "refresh" (still held);
--   kind: "s" session (key = session key), "p" prefix (key = block hash).
-- Each index hash maps worker -> "expiry:tokens"; readers ignore expired fields, a
-- refresh drops them, and the key itself expires with its last live holder.
local worker, ttl = ARGV[1], tonumber(ARGV[2])
local now = now_s(ARGV[3])
for i = 4, #ARGV, 4 do
  local op, kind, key, tokens = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local k = (kind == "s") and k_kvs(key) or k_kvp(key)
  if op == "del" then
    redis.call("HDEL", k, worker)
  elseif op == "put" or redis.call("HEXISTS", k, worker) == 1 then
    redis.call("HSET", k, worker, string.format("%.3f:%s", now + ttl, tokens))
    redis.call("PEXPIRE", k, math.floor(ttl * 1000))
    if op == "refresh" then
      local f = redis.call("HGETALL", k)
      for j = 1, #f, 2 do
        if tonumber(string.match(f[j + 1], "^([^:]+)")) <= now then redis.call("HDEL", k, f[j]) end
      end
    end
  end
end
return 1
