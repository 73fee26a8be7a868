#!/usr/bin/env bash
# Measures the flagship's output quality with the embedded default model on the 14 real
# earnings-call excerpts of ../shared/data: runs queries/earnings_qa.sql on them (no cache), then
# scripts/quality.py on the Parquet it wrote. Usage: scripts/quality.sh [UDF_DIR [WORK_DIR]]
# (the functions of udfs/ and out/quality by default).
set -euo pipefail
cd "$(dirname "$0")/.."
udfs=$(realpath "${1:-udfs}")
scripts/fetch-model.sh
cargo build --locked --bin sluice
work=${2:-out/quality}
rm -rf "$work" && mkdir -p "$work/data/transcripts" "$work/out"
cp ../shared/data/earnings_transcript_excerpts.jsonl "$work/data/transcripts/"
ln -s "$PWD/models" "$work/models"
repo=$PWD
printf 'udf_dir = "%s"\n[cache]\nenabled = false\n' "$udfs" > "$work/sluice.toml"
start=$(date +%s)
(cd "$work" && env -u SLUICE_CONFIG "$repo/target/debug/sluice" run "$repo/queries/earnings_qa.sql")
echo "wall $(( $(date +%s) - start )) s"
(cd "$work" && "$repo/scripts/quality.py" out/earnings_qa.parquet --sluice "$repo/target/debug/sluice")
