#!/usr/bin/env bash
# Makes sure the system packages the embedded llama.cpp builds with are there: cmake, and
# libclang for its bindings. As root they are installed with apt-get; otherwise the exact
# command is printed and the script exits 2. Sourced by scripts/demo.sh and scripts/test.sh.
set -euo pipefail

have_libclang() {
  [ -n "${LIBCLANG_PATH:-}" ] && return 0
  ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 && return 0
  ldconfig -p 2>/dev/null | grep -q 'libclang'
}

if ! command -v cargo >/dev/null 2>&1; then
  echo "error: cargo is required: install Rust with https://rustup.rs" >&2
  exit 2
fi
if command -v cmake >/dev/null 2>&1 && have_libclang; then
  exit 0
fi
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing cmake and libclang-dev (llama.cpp builds with them)" >&2
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q cmake libclang-dev >/dev/null
  exit 0
fi
echo "error: building the embedded llama.cpp needs cmake and libclang; install them with:" >&2
echo "  sudo apt-get install -y cmake libclang-dev" >&2
exit 2
