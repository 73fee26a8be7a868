#!/usr/bin/env bash
# Runs every test of the project: formatting, lints, unit and integration tests.
# Integration tests start the project's own fault-injecting OpenAI-compatible server on 127.0.0.1
# in-process; they read the real excerpts from ../shared/data.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f ../shared/data/earnings_transcript_excerpts.jsonl ]; then
  echo "error: ../shared/data/earnings_transcript_excerpts.jsonl not found (the shared data sits beside the repository)" >&2
  exit 2
fi

cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --locked --all-targets
