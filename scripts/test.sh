#!/usr/bin/env bash
# Runs every test of the project: formatting, lints, unit and integration tests.
#
# Integration tests start their own servers on 127.0.0.1 and stop them by PID: the project's
# fault-injecting OpenAI-compatible server (in-process), and a real S3-compatible server (moto,
# from the virtual environment .venv-moto this script creates). They read the real excerpts
# from ../shared/data, and run the embedded model on the real GGUF (models/, fetched here).
# The Python package (python/) is then built in debug mode into the virtual environment
# .venv-py (sharing target/ with cargo) and tested with pytest against sluice-mock-llm.
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

# The Python package: its lints, then its tests (pytest starts sluice-mock-llm itself).
PY_PACKAGES="maturin==1.16.0 pyarrow==26.0.1 pandas==3.1.1 pytest==9.2.0 polars==2.1.0"
if ! .venv-py/bin/python -c "import maturin, pyarrow, pandas, pytest, polars" 2>/dev/null; then
  echo "setting up .venv-py for the Python package's tests ($PY_PACKAGES)" >&2
  python3 -m venv .venv-py
  .venv-py/bin/pip install --quiet --disable-pip-version-check $PY_PACKAGES
fi
export PYO3_PYTHON="$PWD/.venv-py/bin/python"
# python/ resolves the features `cargo test` does: its lints and its build reuse what the
# commands above compiled, and `cargo test` left target/debug/sluice and sluice-mock-llm.
cargo clippy -p sluice-python --all-targets --locked -- -D warnings
(cd python && VIRTUAL_ENV="$PWD/../.venv-py" PATH="$PWD/../.venv-py/bin:$PATH" maturin develop --locked --quiet)
.venv-py/bin/python -m pytest -q python/tests
