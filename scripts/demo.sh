#!/usr/bin/env bash
# Runs the flagship pipeline (queries/earnings_qa.sql) on the demo corpus in data/.
#
# Until the embedded local model lands, the provider is the project's own OpenAI-compatible test
# server (tests/support/mock_llm.rs), started here on 127.0.0.1 and stopped at the end: its
# answers are canned, tagged with the hash of their prompt. Point [models.default] of a
# sluice.toml at a real server to get real answers (see README).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --locked --bins
mkdir -p out
log=$(mktemp)
./target/debug/sluice-mock-llm --port 0 --latency-ms 20 >"$log" &
server_pid=$!
trap 'kill "$server_pid" 2>/dev/null || true; rm -f "$log" out/demo-sluice.toml' EXIT
for _ in $(seq 1 100); do
  grep -q '^listening ' "$log" && break
  sleep 0.05
done
base_url=$(sed -n 's/^listening //p' "$log")
[ -n "$base_url" ] || { echo "error: the test server did not start" >&2; exit 1; }

cat > out/demo-sluice.toml <<TOML
udf_dir = "../udfs"
[dispatcher]
concurrency = 64
[models.default]
kind = "openai"
base_url = "$base_url"
model = "mock"
TOML
./target/debug/sluice --config out/demo-sluice.toml run queries/earnings_qa.sql
echo "Parquet written to out/earnings_qa.parquet"
