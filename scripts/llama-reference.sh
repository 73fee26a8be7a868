#!/usr/bin/env bash
# llama.cpp's own speed for the embedded model, for comparison with `cargo bench --bench pipeline
# -- local`: builds `llama-batched-bench` from the llama.cpp source that the llama-cpp-sys-2 crate
# vendors (the code sluice links), with the cmake flags the crate's build.rs uses on this machine
# (Release, GGML_NATIVE=OFF, AVX/AVX2/FMA/F16C/BMI2/SSE4.2, no OpenMP, static), and runs it with
# the settings of the local scenario (53 prompt tokens, 48 generated, 1/4/8 sequences, 2 threads).
#
# The crate ships llama.cpp without its tools, so the tool sources come from the
# llama-cpp-python sdist on PyPI (downloaded, never installed or run). Needs cmake, a C++
# compiler, pip and scripts/fetch-model.sh's model. Everything goes under target/llama-reference.
set -euo pipefail
cd "$(dirname "$0")/.."

SYS_VERSION=$(awk '/^name = "llama-cpp-sys-2"/{getline; gsub(/[^0-9.]/, ""); print}' Cargo.lock)
SYS=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/llama-cpp-sys-2-"$SYS_VERSION" | head -1)
[ -d "$SYS/llama.cpp" ] || { echo "llama-cpp-sys-2 $SYS_VERSION not in the cargo registry: run cargo fetch" >&2; exit 1; }
MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$MODEL" ] || scripts/fetch-model.sh

WORK=target/llama-reference
mkdir -p "$WORK"
SDIST=llama_cpp_python-0.3.36
if [ ! -d "$WORK/$SDIST" ]; then
  python3 -m pip download --quiet --no-deps --no-binary=:all: llama-cpp-python==0.3.36 -d "$WORK"
  tar -xzf "$WORK/$SDIST.tar.gz" -C "$WORK"
fi
SRC=$WORK/src-$SYS_VERSION
if [ ! -d "$SRC" ]; then
  cp -r "$SYS/llama.cpp" "$SRC.tmp"
  for tool in batched-bench llama-bench; do
    rm -rf "$SRC.tmp/tools/$tool"
    cp -r "$WORK/$SDIST/vendor/llama.cpp/tools/$tool" "$SRC.tmp/tools/$tool"
  done
  printf 'find_package(Threads REQUIRED)\nllama_add_compile_flags()\nadd_subdirectory(batched-bench)\nadd_subdirectory(llama-bench)\n' \
    > "$SRC.tmp/tools/CMakeLists.txt"
  mv "$SRC.tmp" "$SRC"
fi
FLAGS="-ffunction-sections -fdata-sections -fPIC -m64 -march=x86-64"
cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_C_FLAGS="$FLAGS" -DCMAKE_CXX_FLAGS="$FLAGS" -DBUILD_SHARED_LIBS=OFF \
  -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
  -DGGML_SSE42=ON -DGGML_OPENMP=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_TOOLS=ON > "$WORK/cmake.log"
cmake --build "$WORK/build" --target llama-batched-bench -j "$(nproc)" > "$WORK/build.log"
"$WORK/build/bin/llama-batched-bench" -m "$MODEL" -c 16384 -b 2048 -ub 512 -npp 53 -ntg 48 \
  -npl 1,4,8 -t "$(nproc)" 2>/dev/null | grep '^|'
