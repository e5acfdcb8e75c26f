-- wrk script for the macro benchmark: POST /v1/collect batches with fresh item ids.
--
--   wrk -t1 -c32 -d10s -s load-tests/wrk/collect.lua http://127.0.0.1:3004 -- \
--       IMPRESSIONS EVENTS DEVICES DELAY_MS MAX_RESPONSES RUN_ID
--
-- IMPRESSIONS and EVENTS are items per batch. Each thread cycles through DEVICES device ids, so
-- a device gets its next batch once every DEVICES requests of its thread. DELAY_MS is the pause
-- of each connection between a response and its next request (0 for none). A thread stops after
-- MAX_RESPONSES responses (0 for no limit); -d still bounds the run. done() prints one JSON line.

local threads = {}
local next_thread_id = 1

function setup(thread)
  thread:set("thread_id", next_thread_id)
  next_thread_id = next_thread_id + 1
  table.insert(threads, thread)
end

function init(args)
  impressions = tonumber(args[1] or "20")
  events = tonumber(args[2] or "0")
  devices = tonumber(args[3] or "5000")
  delay_ms = tonumber(args[4] or "0")
  max_responses = tonumber(args[5] or "0")
  run_id = args[6] or "bench"
  sent = 0
  responses = 0
  rejected = 0
  headers = { ["Content-Type"] = "application/json" }
end

function request()
  sent = sent + 1
  local device = string.format("d-%s-%d-%d", run_id, thread_id, sent % devices)
  local prefix = string.format("%s-%d-%d", run_id, thread_id, sent)
  local items = {}
  for i = 1, impressions do
    items[i] = string.format(
      '{"impressionId":"i-%s-%d","feature":"Recommendations","time":1733310000000,'
        .. '"args":{"slot":"page-%d","product":"p-%d","position":%d},'
        .. '"outputs":{"callToAction":"Rate it","score":0.42},"variants":["cta-test:B"]}',
      prefix, i, i, i, i)
  end
  local acts = {}
  for i = 1, events do
    acts[i] = string.format(
      '{"eventId":"e-%s-%d","name":"Click","time":1733310001000,"impressionId":"i-%s-%d",'
        .. '"fields":{"stars":4,"source":"wrk"}}',
      prefix, i, prefix, ((i - 1) % math.max(impressions, 1)) + 1)
  end
  local body = string.format(
    '{"deviceId":"%s","sessionKey":"tab-1","sentAt":1733310002000,'
      .. '"context":{"entryUrl":"https://shop.example/p/42","referrer":"https://search.example/",'
      .. '"userAgent":"wrk","clientType":"web"},"args":{"userId":"u-1","plan":"pro"},'
      .. '"impressions":[%s],"events":[%s]}',
    device, table.concat(items, ","), table.concat(acts, ","))
  return wrk.format("POST", "/v1/collect", headers, body)
end

function delay()
  return delay_ms
end

function response(status, headers, body)
  responses = responses + 1
  if status ~= 200 then
    rejected = rejected + 1
  end
  if max_responses > 0 and responses >= max_responses then
    wrk.thread:stop()
  end
end

function done(summary, latency, requests)
  local not_200 = 0
  for _, thread in ipairs(threads) do
    not_200 = not_200 + thread:get("rejected")
  end
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"rps":%.1f,"not_200":%d,"errors":%d,'
      .. '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, summary.requests / (summary.duration / 1e6), not_200,
    summary.errors.connect + summary.errors.read + summary.errors.write
      + summary.errors.timeout + summary.errors.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
