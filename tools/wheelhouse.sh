#!/usr/bin/env bash
# Offline install for air-gapped sites.
#
#   On a machine with internet (same OS, CPU architecture and Python minor version as the site):
#     tools/wheelhouse.sh build  wheelhouse/          # wheels of diffseg and every dependency but torch
#   Copy wheelhouse/ to the site, then in the site's environment (torch already installed there):
#     tools/wheelhouse.sh install wheelhouse/         # no index is contacted; torch is left as it is
#
# torch is left out on purpose: sites install the build that matches their GPU driver (module, conda
# or vendor wheel). Add it with WITH_TORCH=1 if the site has none (a CPU build: set PIP_CONSTRAINT).
set -euo pipefail
cmd=${1:-}; dir=${2:-wheelhouse}
here=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
case "$cmd" in
  build)
    mkdir -p "$dir"
    # Resolve the full dependency set once, with a torch pin so the resolver does not fetch a CUDA build.
    "$py" -m pip wheel --quiet --wheel-dir "$dir" -c "$here/constraints-cpu.txt" "$here[scoring,test]"
    if [ "${WITH_TORCH:-0}" != 1 ]; then
      rm -f "$dir"/torch-*.whl "$dir"/nvidia_*.whl "$dir"/triton-*.whl
    fi
    echo "wheelhouse: $(ls "$dir" | wc -l) wheels in $dir"
    ;;
  install)
    "$py" -c "import torch" 2>/dev/null || [ -n "$(ls "$dir"/torch-*.whl 2>/dev/null)" ] || {
      echo "wheelhouse: no torch installed and none in $dir: install your site's torch first" >&2; exit 1; }
    "$py" -m pip install --no-index --find-links "$dir" "diffseg[scoring,test]"
    ;;
  *)
    echo "usage: tools/wheelhouse.sh build|install DIR" >&2; exit 2 ;;
esac
