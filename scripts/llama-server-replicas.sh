#!/usr/bin/env bash
# Prefix reuse on real inference servers: builds llama.cpp's own `llama-server` and runs the
# flagship (queries/earnings_qa.sql) over the 14 real excerpts against one model served by
#   one     - one llama-server,
#   two     - two llama-servers as replicas (`base_url = [...]`),
#   two-off - the same two with `share_prefixes = false`,
# each time on freshly started servers, and prints per run the prompt tokens sluice sent (the
# servers' `usage`), the prompt tokens the servers evaluated (their `/metrics` counter
# `llamacpp:prompt_tokens_total`, which leaves out tokens taken from their prompt caches) and
# the wall time of `sluice run`. `CASES="one two"` picks runs.
#
# The server comes from the llama.cpp that the llama-cpp-python sdist on PyPI vendors
# (downloaded with pip, never installed or run), built Release with the instruction sets the
# llama-cpp-sys-2 crate builds with (AVX2/FMA/F16C/BMI2, not -march=native: ggml's AMX kernel
# crashes on CPUs with AMX), without OpenMP and without its web UI (nothing is fetched at build
# time). Servers: `-c 8192 -np 4 -t 1
# --metrics`, llama-server's prompt-cache defaults (`cache_prompt`, slot choice by prompt
# similarity 0.10, 8 GiB host-memory prompt cache). sluice: `concurrency = 4` per server, the
# response cache off. Needs cmake, a C++ compiler, pip, curl, python3, scripts/fetch-model.sh's
# model, the data set ../shared/data/earnings_transcript_excerpts.jsonl (DATA=...) and a built
# sluice (SLUICE=..., default target/release/sluice, else target/debug/sluice). Everything goes
# under target/llama-server (the build is about 1 GB).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

MODEL=$ROOT/models/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$MODEL" ] || scripts/fetch-model.sh
DATA=${DATA:-$ROOT/../shared/data/earnings_transcript_excerpts.jsonl}
[ -f "$DATA" ] || { echo "no data set at $DATA (set DATA=...)" >&2; exit 1; }
if [ -z "${SLUICE:-}" ]; then
  SLUICE=$ROOT/target/release/sluice
  [ -x "$SLUICE" ] || SLUICE=$ROOT/target/debug/sluice
fi
[ -x "$SLUICE" ] || { echo "no sluice binary at $SLUICE: cargo build --release, or set SLUICE=..." >&2; exit 1; }
SLUICE=$(realpath "$SLUICE")
BASE_PORT=${BASE_PORT:-8080}
THREADS=${THREADS:-1}
CASES=${CASES:-one two two-off}

WORK=$ROOT/target/llama-server
mkdir -p "$WORK"
SDIST=llama_cpp_python-0.3.36
if [ ! -d "$WORK/$SDIST" ]; then
  python3 -m pip download --quiet --no-deps --no-binary=:all: llama-cpp-python==0.3.36 -d "$WORK"
  tar -xzf "$WORK/$SDIST.tar.gz" -C "$WORK"
fi
SERVER=$WORK/build/bin/llama-server
if [ ! -x "$SERVER" ]; then
  cmake -S "$WORK/$SDIST/vendor/llama.cpp" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
    -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
    -DGGML_SSE42=ON -DGGML_OPENMP=OFF > "$WORK/cmake.log"
  cmake --build "$WORK/build" --target llama-server -j "${JOBS:-$(nproc)}" > "$WORK/build.log"
fi

PIDS=()
stop_servers() {
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  PIDS=()
}
trap stop_servers EXIT

# start_servers DIR N: N fresh servers on BASE_PORT+1.., each answering /health within 120 s.
start_servers() {
  local dir=$1 n=$2 i port deadline
  for i in $(seq 1 "$n"); do
    port=$((BASE_PORT + i))
    "$SERVER" -m "$MODEL" --host 127.0.0.1 --port "$port" --metrics -c 8192 -np 4 -t "$THREADS" \
      --alias smollm > "$dir/server-$i.log" 2>&1 &
    PIDS+=($!)
  done
  deadline=$((SECONDS + 120))
  for i in $(seq 1 "$n"); do
    port=$((BASE_PORT + i))
    until curl -sf "http://127.0.0.1:$port/health" > /dev/null; do
      if [ $SECONDS -ge $deadline ]; then
        echo "llama-server on port $port not ready after 120 s (see $dir/server-$i.log)" >&2
        exit 1
      fi
      sleep 0.2
    done
  done
}

# counter PORT NAME: a llama-server /metrics counter.
counter() {
  curl -sf "http://127.0.0.1:$1/metrics" | awk -v k="llamacpp:$2" '$1 == k { print $2 }'
}

printf '%-8s %8s %8s %10s %10s %8s %7s %6s %s\n' run sent cached_rep evaluated cached_srv wall_s waits hedges per-server-evaluated
for case in $CASES; do
  case $case in
    one) n=1; share=true ;;
    two) n=2; share=true ;;
    two-off) n=2; share=false ;;
    *) echo "unknown case $case (one, two, two-off)" >&2; exit 1 ;;
  esac
  dir=$WORK/runs/$case
  rm -rf "$dir"
  mkdir -p "$dir/data/transcripts" "$dir/queries"
  cp "$DATA" "$dir/data/transcripts/"
  cp queries/earnings_qa.sql "$dir/queries/"
  urls=$(for i in $(seq 1 "$n"); do printf '"http://127.0.0.1:%d/v1",' $((BASE_PORT + i)); done)
  cat > "$dir/sluice.toml" <<EOF
udf_dir = "$ROOT/udfs"

[cache]
enabled = false

[models.default]
kind = "openai"
base_url = [${urls%,}]
model = "smollm"
concurrency = 4
timeout_ms = 600000
share_prefixes = $share
EOF
  start_servers "$dir" "$n"
  start=$(date +%s.%N)
  (cd "$dir" && "$SLUICE" run queries/earnings_qa.sql --metrics-json m.json > run.log 2>&1)
  end=$(date +%s.%N)
  evaluated=0; cached=0; per=""
  for i in $(seq 1 "$n"); do
    e=$(counter $((BASE_PORT + i)) prompt_tokens_total)
    c=$(counter $((BASE_PORT + i)) prompt_tokens_cached_total)
    evaluated=$(python3 -c "print(int($evaluated + $e))")
    cached=$(python3 -c "print(int($cached + $c))")
    per="$per ${e%.*}"
  done
  stop_servers
  python3 - "$dir/m.json" "$case" "$evaluated" "$cached" "$start" "$end" "$per" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))
case, evaluated, cached, start, end, per = sys.argv[2:]
waits = sum(f.get("prefix_waits", 0) for f in m["functions"].values())
print(f'{case:<8} {m["tokens_in"]:>8} {m["tokens_cached"]:>10} {evaluated:>10} {cached:>10} '
      f'{float(end) - float(start):>8.1f} {waits:>7} {m["hedges"]:>6} {per.strip()}')
EOF
done
