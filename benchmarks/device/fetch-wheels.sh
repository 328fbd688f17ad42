#!/usr/bin/env bash
# Here (no GPU), before a GPU call: the wheels the GPU machine's image lacks, at the versions this
# checkout's .venv runs, built/downloaded for its Python (3.12, manylinux x86-64) into .whl/
# (git-ignored). Its image already has torch, numpy, pillow, pyyaml, tqdm, psutil, ninja, einops,
# msgpack, py-cpuinfo and packaging (../.library/device/KINDS.md).
#
#   bash benchmarks/device/fetch-wheels.sh        # then: run gpu-suite.sh with carry [".whl"]
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PY:-.venv/bin/python}"
PYVER="${PYVER:-3.12}"
# deepspeed and its hjson; webdataset and its braceexpand; pydantic (deepspeed's config and our recipes)
PKGS=(deepspeed hjson webdataset braceexpand pydantic pydantic-core annotated-types typing-inspection
      typing-extensions)
rm -rf .whl && mkdir -p .whl
for name in "${PKGS[@]}"; do
    version="$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")"
    if [[ "$name" == deepspeed ]]; then
        # Published as an sdist only: build the pure-Python wheel (no ops prebuilt; they JIT where needed).
        DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==$version"
    else
        "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d .whl "$name==$version"
    fi
done
ls -l .whl
du -sh .whl
