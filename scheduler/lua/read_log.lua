-- What a reader of one request sees at one instant: whether it is still queued or
-- running, its output log's length, and the log from entry `since` on (the API:
-- live readers refilling a gap, resumed streams, readers riding out an outage).
-- ARGV: rid, since
-- Returns {exists (0/1), log length, {entries...}}.
local rid, since = ARGV[1], tonumber(ARGV[2])
local log = k_out(rid)
return {redis.call("EXISTS", k_req(rid)), redis.call("LLEN", log), redis.call("LRANGE", log, since, -1)}
