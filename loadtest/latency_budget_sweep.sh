#!/usr/bin/env bash
# How the batcher's latency budget decides 503s under 64 concurrent clients.
#
#   loadtest/latency_budget_sweep.sh [USERS] [SECONDS]
#
# For each (max_batch_size, max_latency_ms, warm-up requests) below, starts a real
# `bentoml serve` on the newest stored model, waits for /readyz, runs headless Locust with
# USERS single-image clients for SECONDS, stops the server and prints one line of results.
# Needs a stored model (make serve, or convserve export) and the loadtest extra.
set -euo pipefail
cd "$(dirname "$0")/.."
users=${1:-64}
seconds=${2:-20}
port=${PORT:-3201}
out=$(mktemp -d)
configs=(
  "ours 128 2000 12"
  "bentoml-1.4-defaults-cold 100 60000 0"
  "budget-300ms 100 300 12"
  "budget-100ms 100 100 12"
  "budget-10ms-cold 100 10 0"
)
for config in "${configs[@]}"; do
  read -r name batch latency warmup <<<"$config"
  CONVSERVE_MAX_BATCH_SIZE=$batch CONVSERVE_MAX_LATENCY_MS=$latency \
    CONVSERVE_WARMUP_REQUESTS=$warmup setsid .venv/bin/bentoml serve \
    convserve.service.app:Classifier --port "$port" >"$out/$name.server.log" 2>&1 &
  pid=$!
  until curl -sf -o /dev/null "http://127.0.0.1:$port/readyz"; do
    kill -0 "$pid" 2>/dev/null || { cat "$out/$name.server.log"; exit 1; }
    sleep 0.3
  done
  .venv/bin/locust -f loadtest/locustfile.py --host "http://127.0.0.1:$port" --headless \
    -u "$users" -r "$users" -t "${seconds}s" --csv "$out/$name" --only-summary \
    >"$out/$name.locust.log" 2>&1 || true  # locust exits 1 when any request failed
  kill -TERM -- "-$pid"
  wait "$pid" 2>/dev/null || true
  .venv/bin/python - "$out/$name" "$name" "$batch" "$latency" "$warmup" <<'PY'
import csv, sys
prefix, name, batch, latency, warmup = sys.argv[1:]
agg = {r["Name"]: r for r in csv.DictReader(open(f"{prefix}_stats.csv"))}["Aggregated"]
n, failed = int(agg["Request Count"]), int(agg["Failure Count"])
print(f"{name:<28} batch {batch:>3} budget {latency:>5} ms warm-up {warmup:>2}: "
      f"{n} requests, {failed} failed ({100 * failed / max(n, 1):.1f}%), "
      f"{float(agg['Requests/s']):.0f} req/s, p50/p95/p99 {agg['50%']}/{agg['95%']}/{agg['99%']} ms")
PY
done
echo "raw Locust CSVs in $out"
