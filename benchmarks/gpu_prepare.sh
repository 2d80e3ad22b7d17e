#!/usr/bin/env bash
# Here, before a GPU check: fill .gpu/ (git-ignored, carried to the GPU machine, < 64 MiB) with the
# real class-balanced 10,000/2,000 CIFAR-10 subset (the one benchmarks/gpu_check_cpu_reference.json was
# trained on), the subset tool (numpy only; gpu_check.sh writes the full-size folder with it there) and
# the wheels of what the GPU machine's image lacks (torchinfo). Then, with the device tool:
#   run(command="bash benchmarks/gpu_check.sh", carry=[".gpu"], timeout_s=560)
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
rm -rf .gpu && mkdir -p .gpu/whl
python3 "$SHARED/tools/cifar10_subset.py" "$SHARED/cifar10" .gpu/sub --train 10000 --test 2000
cp "$SHARED/tools/cifar10_subset.py" .gpu/
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform any -d .gpu/whl torchinfo==1.8.0
du -sh .gpu
