-- POST the bytes of a file on every request, over keep-alive connections.
-- wrk -s bench/post.lua URL -- BODY_FILE [AUTHORIZATION]
-- init() runs before wrk builds its one static request, so the request stays static (fast).
function init(args)
  local file = assert(io.open(args[1], "rb"))
  wrk.method = "POST"
  wrk.body = file:read("*a")
  file:close()
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["User-Agent"] = "analytics-python/2.4.0"
  if args[2] ~= nil and args[2] ~= "" then
    wrk.headers["Authorization"] = args[2]
  end
end
