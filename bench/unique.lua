-- POST the bytes of a file whose messageId holds "@N@", replaced by a counter on every
-- request, so that every request is a new event (the pipeline deduplicates resent ones).
-- wrk -t1 -s bench/unique.lua URL -- BODY_FILE [AUTHORIZATION]   (one thread: one counter)
local head, tail
local count = 0

function init(args)
  local file = assert(io.open(args[1], "rb"))
  local body = file:read("*a")
  file:close()
  local at = assert(string.find(body, "@N@", 1, true), "the body holds no @N@")
  head, tail = string.sub(body, 1, at - 1), string.sub(body, at + 3)
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["User-Agent"] = "analytics-python/2.4.0"
  if args[2] ~= nil and args[2] ~= "" then
    wrk.headers["Authorization"] = args[2]
  end
end

function request()
  count = count + 1
  return wrk.format(nil, nil, nil, head .. count .. tail)
end
