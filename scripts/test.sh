#!/usr/bin/env bash
# Runs every test of the project: formatting, lints, unit and integration tests.
#
# Integration tests start their own servers on 127.0.0.1 and stop them by PID: the project's
# fault-injecting OpenAI-compatible server (in-process), and a real S3-compatible server (moto,
# from the virtual environment .venv-moto this script creates). They read the real excerpts
# from ../shared/data, and run the embedded model on the real GGUF (models/, fetched here).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f ../shared/data/earnings_transcript_excerpts.jsonl ]; then
  echo "error: ../shared/data/earnings_transcript_excerpts.jsonl not found (the shared data sits beside the repository)" >&2
  exit 2
fi

scripts/deps.sh

MOTO_VERSION=5.2.5
if [ ! -x .venv-moto/bin/moto_server ]; then
  echo "setting up moto[server]==$MOTO_VERSION in .venv-moto (S3-compatible test server)" >&2
  python3 -m venv .venv-moto
  .venv-moto/bin/pip install --quiet --disable-pip-version-check "moto[server]==$MOTO_VERSION"
fi
export SLUICE_MOTO_SERVER="$PWD/.venv-moto/bin/moto_server"
# DuckDB reads back the embeddings sluice writes (tests/operators.rs), in the same environment.
DUCKDB_VERSION=1.5.6
if ! .venv-moto/bin/python -c "import duckdb" 2>/dev/null; then
  echo "installing duckdb==$DUCKDB_VERSION in .venv-moto" >&2
  .venv-moto/bin/pip install --quiet --disable-pip-version-check "duckdb==$DUCKDB_VERSION"
fi
export SLUICE_DUCKDB_PYTHON="$PWD/.venv-moto/bin/python"

# The embedded model's tests run the real GGUF.
scripts/fetch-model.sh

cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --locked --all-targets
