#!/usr/bin/env bash
# Create .venv in the repository root with a Python >= 3.12 found on this machine,
# then install anode-jax with its dev extra (tests, benchmarks, notebooks), and build the
# optional oneDNN convolution extension when this machine can (ANODE_JAX_ONEDNN=0 skips it).
#
# Search order: $PYTHON (if set), python3.14, python3.13, python3.12, python3 on PATH, then
# interpreters installed under pyenv (whether or not pyenv selects them), then uv's.
set -euo pipefail
cd "$(dirname "$0")/.."

MIN_MINOR=12

is_suitable() {
  # True when "$@" runs a CPython >= 3.12 that has the venv module.
  "$@" -c "import sys, venv; sys.exit(0 if sys.version_info[:2] >= (3, $MIN_MINOR) else 1)" \
    >/dev/null 2>&1
}

candidates=()
[ -n "${PYTHON:-}" ] && candidates+=("$PYTHON")
for name in python3.14 python3.13 python3.12 python3; do
  command -v "$name" >/dev/null 2>&1 && candidates+=("$(command -v "$name")")
done
pyenv_root="${PYENV_ROOT:-$HOME/.pyenv}"
if [ -d "$pyenv_root/versions" ]; then
  # Newest first; real binaries, so the pyenv shim's version selection does not matter.
  while IFS= read -r dir; do
    for bin in "$dir"/bin/python3.1[2-9] "$dir"/bin/python3; do
      [ -x "$bin" ] && candidates+=("$bin")
    done
  done < <(ls -d "$pyenv_root"/versions/3.* 2>/dev/null | sort -V -r)
fi
for dir in "$HOME"/.local/share/uv/python/cpython-3.1[2-9]*; do
  [ -x "$dir/bin/python3" ] && candidates+=("$dir/bin/python3")
done

python=""
for cand in "${candidates[@]}"; do
  # A pyenv shim may refuse a version that is installed but not selected; try it as is,
  # then with that version selected explicitly.
  if is_suitable "$cand"; then python="$cand"; break; fi
done

if [ -z "$python" ]; then
  echo "setup: no Python >= 3.$MIN_MINOR found (tried: ${candidates[*]:-nothing})." >&2
  echo "setup: anode-jax needs Python >= 3.$MIN_MINOR (jax >= 0.11 does). Install one" >&2
  echo "setup: (python.org, your package manager, 'pyenv install 3.12', or 'uv python install 3.12')," >&2
  echo "setup: or point PYTHON=/path/to/python3.12 at it, then run this script again." >&2
  exit 1
fi
echo "setup: using $python ($("$python" -c 'import sys; print(sys.version.split()[0])'))"

if [ -x .venv/bin/python ] && ! is_suitable .venv/bin/python; then
  echo "setup: existing .venv has an older Python; recreating it"
  rm -rf .venv
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[dev]"

# Optional: oneDNN's convolution kernels as XLA custom calls (anode_jax.nn.onednn), one more
# candidate that the convolution autotuner measures per shape (docs/bench_onednn.md). Needs
# Linux x86-64, g++ and the package registry; skip it with ANODE_JAX_ONEDNN=0. When it cannot
# be built the library runs on XLA's own kernels, as before: setup does not fail.
if [ "${ANODE_JAX_ONEDNN:-1}" = "0" ]; then
  echo "setup: optional oneDNN extension skipped (ANODE_JAX_ONEDNN=0)"
  if [ -f anode_jax/nn/onednn/_onednn_conv.so ]; then
    echo "setup: an extension built earlier is still there and will be used; set" \
      "ANODE_JAX_ONEDNN=0 when running too, or delete anode_jax/nn/onednn/_onednn_conv.so"
  fi
elif [ "$(uname -s)-$(uname -m)" != "Linux-x86_64" ] || ! command -v g++ >/dev/null 2>&1; then
  echo "setup: optional oneDNN extension not built (needs Linux x86-64 and g++); XLA's kernels are used"
else
  mkdir -p build
  if bash scripts/build_onednn.sh .venv/bin/python >build/onednn-build.log 2>&1 \
    && .venv/bin/python -c "from anode_jax.nn import onednn; assert onednn.available(), onednn.unavailable_reason()" \
      >>build/onednn-build.log 2>&1; then
    echo "setup: built the optional oneDNN extension (anode_jax/nn/onednn/_onednn_conv.so)"
  else
    rm -f anode_jax/nn/onednn/_onednn_conv.so
    echo "setup: optional oneDNN extension not built (see build/onednn-build.log); XLA's kernels are used"
  fi
fi
echo "setup: done. Activate with 'source .venv/bin/activate', or run .venv/bin/python directly."
