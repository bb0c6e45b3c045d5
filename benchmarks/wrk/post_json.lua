-- POST the JSON file named after `--` on wrk's command line, the same body on every request:
--   wrk -t1 -c8 -d8s --latency -s load/wrk/post_json.lua http://127.0.0.1:8080/recommend -- body.json
-- The request is built once per thread (no per-request Lua), so wrk stays cheap next to the servers.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

function init(args)
   local f = assert(io.open(args[1], "rb"), "usage: ... -- <body.json>")
   wrk.body = f:read("*a")
   f:close()
end
