-- wrk script for benchmarks.concurrency: closed-loop next-token requests, each with a 100-character prompt
-- that no other request shares (a pseudo-random one per request, per wrk thread).
local counter = 0
local offset = 0
function init(args)
  -- the first argument after "--": where this run's prompts start, so that no run repeats another's
  offset = tonumber(args[1]) or 0
end
local letters = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ,.;"
local n = #letters
local thread_id = 0
function setup(thread)
  thread:set("tid", thread_id)
  thread_id = thread_id + 1
end
function request()
  counter = counter + 1
  local x = (offset + counter) * 7919 + tid * 1000003
  local parts = {}
  for i = 1, 100 do
    x = (x * 1103515245 + 12345) % 2147483648
    local k = (x % n) + 1
    parts[i] = letters:sub(k, k)
  end
  local body = '{"text": "' .. table.concat(parts) .. '", "top_k": 5}'
  return wrk.format("POST", "/v1/next-token", {["Content-Type"] = "application/json"}, body)
end
local statuses = {}
function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end
