#!/usr/bin/env bash
# `make gpu-pack`: everything `make gpu-check` needs on an offline GPU machine, in one git-ignored folder.
#   .gpu/fashion-mnist/   the four Fashion-MNIST idx files (gzipped, as Debian ships them)
#   .gpu/wheels/          cp312 manylinux wheels of the dependencies the GPU image lacks (simplejpeg)
# The GPU image (Python 3.12, torch 2.11, torchvision 0.26) has numpy, safetensors, tqdm, pillow,
# matplotlib and setuptools already; see benchmarks/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=.gpu
rm -rf "$OUT.tmp" && mkdir -p "$OUT.tmp/fashion-mnist" "$OUT.tmp/wheels"
src=$($PY -c 'from phalanx.data.sources import find_fashion_mnist, cache_dir; print(find_fashion_mnist(True, cache_dir()))')
cp "$src"/*-ubyte* "$OUT.tmp/fashion-mnist/"
# Only what the image lacks: carrying torch or numpy would replace the image's CUDA build.
WHEELS=${GPU_WHEELS:-"simplejpeg>=1.7"}
platforms=""
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms="$platforms --platform $p"
done
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms \
  -d "$OUT.tmp/wheels" $WHEELS
rm -rf "$OUT" && mv "$OUT.tmp" "$OUT"
du -sh "$OUT" "$OUT"/*
ls "$OUT"/fashion-mnist "$OUT"/wheels
