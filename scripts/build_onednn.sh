#!/usr/bin/env bash
# Builds the optional oneDNN convolution extension (anode_jax/nn/onednn/_onednn_conv.so).
#
# oneDNN comes from the package registry's CPU-only GNU-OpenMP wheels (onednn-cpu-gomp and its
# headers onednn-devel-cpu-gomp, 2023.2.0 = oneDNN 3.2), downloaded with pip into
# build/onednn/ and unpacked there: nothing is installed into the Python environment. Or set
# ONEDNN_ROOT to an existing oneDNN install (with include/ and lib/libdnnl.so).
# The XLA FFI headers come from the installed jax (`jax.ffi.include_dir()`); the extension is
# tied to that jaxlib's FFI API version (rebuild after upgrading jax).
#
# Usage: scripts/build_onednn.sh [python]   (default .venv/bin/python); needs g++ (C++17).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${1:-.venv/bin/python}
ONEDNN_VERSION=2023.2.0
if [[ -z "${ONEDNN_ROOT:-}" ]]; then
  ONEDNN_ROOT=build/onednn/root
  if [[ ! -f $ONEDNN_ROOT/lib/libdnnl.so.3 ]]; then
    mkdir -p build/onednn/wheels "$ONEDNN_ROOT"
    "$PYTHON" -m pip download --no-deps -d build/onednn/wheels \
      "onednn-cpu-gomp==$ONEDNN_VERSION" "onednn-devel-cpu-gomp==$ONEDNN_VERSION"
    for wheel in build/onednn/wheels/*.whl; do
      "$PYTHON" -m zipfile -e "$wheel" build/onednn/unpacked
    done
    cp -r build/onednn/unpacked/*.data/data/include "$ONEDNN_ROOT/"
    mkdir -p "$ONEDNN_ROOT/lib"
    cp build/onednn/unpacked/onednn_cpu_gomp-*.data/data/lib/libdnnl.so.3 "$ONEDNN_ROOT/lib/"
    ln -sf libdnnl.so.3 "$ONEDNN_ROOT/lib/libdnnl.so"
    rm -rf build/onednn/unpacked
  fi
fi
ONEDNN_ROOT=$(cd "$ONEDNN_ROOT" && pwd)
FFI_INCLUDE=$("$PYTHON" -c "import jax; print(jax.ffi.include_dir())")
OUT=anode_jax/nn/onednn/_onednn_conv.so
g++ -O2 -std=c++17 -shared -fPIC -Wno-attributes -Wno-return-type \
  -I "$FFI_INCLUDE" -I "$ONEDNN_ROOT/include" \
  anode_jax/nn/onednn/conv.cc -o "$OUT" \
  -L "$ONEDNN_ROOT/lib" -ldnnl -Wl,-rpath,"$ONEDNN_ROOT/lib"
echo "built $OUT against $ONEDNN_ROOT"
