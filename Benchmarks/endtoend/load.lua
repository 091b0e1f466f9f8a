-- wrk script: POSTs mParticle batches built from templates, each with a fresh MPID, batch_id and
-- source_message_id prefix, with HTTP Basic auth of the tenants in turn.
--   wrk ... -s load.lua URL -- TEMPLATES CREDENTIALS RATE THREADS
-- TEMPLATES: one "EVENTS<TAB>BODY" per line; BODY holds {{MPID}}, {{BID}} and {{U}} placeholders.
-- CREDENTIALS: one "Basic ..." Authorization value per line.
-- RATE: requests per second for the whole run (0: as fast as the server answers).
-- Prints one line "BENCH {json}" at the end.
local ffi = require("ffi")
ffi.cdef [[
  typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
  int clock_gettime(int clock, bench_timespec *t);
]]
local clock = ffi.new("bench_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, clock)
  return tonumber(clock.tv_sec) * 1000 + tonumber(clock.tv_nsec) / 1e6
end

local threads, next_tid = {}, 0
function setup(thread)
  next_tid = next_tid + 1
  thread:set("tid", next_tid)
  table.insert(threads, thread)
end

local templates, creds, interval, next_slot = {}, {}, 0, 0
seq, ok, other, events_sent, requests_sent = 0, 0, 0, 0, 0
statuses = ""
local status_counts = {}

function init(args)
  for line in io.lines(args[1]) do
    local n, body = line:match("^(%d+)\t(.*)$")
    local t = { events = tonumber(n), parts = {}, names = {} }
    local pos = 1
    while true do
      local s, e, name = body:find("{{(%u+)}}", pos)
      if not s then break end
      table.insert(t.parts, body:sub(pos, s - 1))
      table.insert(t.names, name)
      pos = e + 1
    end
    table.insert(t.parts, body:sub(pos))
    table.insert(templates, t)
  end
  for line in io.lines(args[2]) do table.insert(creds, line) end
  local rate, nthreads = tonumber(args[3]), tonumber(args[4])
  if rate > 0 then interval = 1000 * nthreads / rate end
  math.randomseed(tid * 7919 + os.time())
  seq = tid * 7 -- threads start at different templates
  wrk.headers["Content-Type"] = "application/json"
end

local function id64() -- a random signed 64-bit id as decimal text
  return string.format("%s%d%09d", math.random() < 0.5 and "-" or "", math.random(100000000, 922337203),
    math.random(0, 999999999))
end

function delay()
  if interval == 0 then return 0 end
  local t = now_ms()
  if next_slot < t then next_slot = t end
  local d = next_slot - t
  next_slot = next_slot + interval
  return d
end

function request()
  seq = seq + 1
  local t = templates[seq % #templates + 1]
  local values = { MPID = id64(), BID = id64(), U = string.format("%x-%x", tid, seq) }
  local buf, names, parts = {}, t.names, t.parts
  for i = 1, #names do
    buf[2 * i - 1] = parts[i]
    buf[2 * i] = values[names[i]]
  end
  buf[#buf + 1] = parts[#parts]
  events_sent = events_sent + t.events
  requests_sent = requests_sent + 1
  wrk.headers["Authorization"] = creds[seq % #creds + 1]
  return wrk.format("POST", nil, nil, table.concat(buf))
end

function response(status, headers, body)
  if status == 202 then
    ok = ok + 1
  else
    other = other + 1
    status_counts[status] = (status_counts[status] or 0) + 1
    local s = {}
    for k, v in pairs(status_counts) do table.insert(s, k .. ":" .. v) end
    statuses = table.concat(s, ",")
  end
end

function done(summary, latency, requests)
  local sum = { ok = 0, other = 0, events_sent = 0, requests_sent = 0 }
  local codes = {}
  for _, t in ipairs(threads) do
    for k in pairs(sum) do sum[k] = sum[k] + t:get(k) end
    if t:get("statuses") ~= "" then table.insert(codes, t:get("statuses")) end
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH {"completed": %d, "duration_us": %d, "ok": %d, "other": %d, "statuses": "%s", "events_sent": %d, ' ..
    '"requests_sent": %d, "p50_us": %d, "p99_us": %d, "p999_us": %d, "max_us": %d, "socket_errors": %d}\n',
    summary.requests, summary.duration, sum.ok, sum.other, table.concat(codes, ","), sum.events_sent,
    sum.requests_sent, latency:percentile(50), latency:percentile(99), latency:percentile(99.9), latency.max,
    e.connect + e.read + e.write + e.timeout))
end
