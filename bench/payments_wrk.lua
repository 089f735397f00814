-- wrk script for bench/payments.sh: POST /v1/payments, each request with an
-- Idempotency-Key no other request uses (run id + wrk thread + counter), so
-- every request creates a payment instead of replaying the first one.
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end

local counter = 0
local prefix
local body = '{"merchant_id":"acme","amount":1250,"currency":"EUR","reference":"bench"}'

function init(args)
  prefix = string.format("bench-%s-%d-", os.getenv("RUN_ID") or os.time(), tid or 0)
end

function request()
  counter = counter + 1
  return wrk.format("POST", "/v1/payments", {
    ["Content-Type"] = "application/json",
    ["Idempotency-Key"] = prefix .. counter,
  }, body)
end

