#!/usr/bin/env bash
# Sets everything up and runs the flagship pipeline (queries/earnings_qa.sql) on the demo corpus
# in data/ with the embedded local model — no server, no API key:
#   1. fetches the default model (SmolLM2-135M-Instruct Q4_1, ~98 MB) into models/, checksum
#      verified (scripts/fetch-model.sh);
#   2. builds sluice with the dev profile the tests build too (llama.cpp, where the time goes, is
#      optimised in it; see Cargo.toml), so `scripts/test.sh` afterwards reuses the build;
#      llama.cpp needs cmake and libclang, installed by scripts/deps.sh when missing;
#   3. runs the query with a progress display, writes out/earnings_qa.parquet and shows rows.
#
# `scripts/demo.sh --mock` runs the same query against the project's fault-injecting test server
# instead (canned answers tagged with the hash of their prompt), for a check without the model.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh
if [ "${1:-}" != "--mock" ]; then
  scripts/fetch-model.sh
  cargo build --locked --bin sluice
  mkdir -p out
  # No sluice.toml: the `default` model is the embedded one in models/.
  env -u SLUICE_CONFIG ./target/debug/sluice run queries/earnings_qa.sql
  echo "Parquet written to out/earnings_qa.parquet"
  exit 0
fi

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
[cache]
enabled = false
[models.default]
kind = "openai"
base_url = "$base_url"
model = "mock"
TOML
./target/debug/sluice --config out/demo-sluice.toml run queries/earnings_qa.sql
echo "Parquet written to out/earnings_qa.parquet"
