#!/usr/bin/env bash
# GPU check of the SFT and GRPO trainers at the paper's scale: a few SFT steps and one GRPO step
# in bf16 on a randomly initialised Qwen2.5-VL-7B (the real architecture, committed as
# jobs/visionr1_jobs/training/model_configs/qwen2_5_vl_7b.json), with ~4k-token completions and
# 768x768 images, printing tokens/s per GPU and peak GPU memory as one JSON line
# (DEVICE_CHECK {...}, also $OUT/device_check.json). See visionr1_jobs/training/device_check.py
# for what fits one GPU and the fallbacks (--optim sgd, --layers N).
#
#   scripts/device-check.sh prepare   # where PyPI is reachable: the wheels the GPU machine lacks
#                                     # (trl, datasets, deepspeed, pydantic, math-verify, ...) into .whl/;
#                                     # WITH_PYARROW=1 adds pyarrow 25 (50 MB) for a machine below 21
#   scripts/device-check.sh [ARGS]    # on the GPU machine (python3 with CUDA torch + transformers):
#                                     # installs .whl/ into /tmp/site, runs the check under torchrun
#
# The GPU machine cannot reach PyPI; carry .whl/ with the working tree (about 10 MiB). ARGS go
# to the check, e.g. --optim sgd, --layers 8, --budget 1024, --only grpo.
set -euo pipefail
cd "$(dirname "$0")/.."

PY_VERSION=3.12
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64)
# What the GPU machine's Python (torch, transformers, accelerate, pyarrow, pandas, huggingface-hub
# already there) lacks for the trainers; trl as pinned in images/trainer/constraints.txt.
# datasets 4.7 rather than 5.x: it needs pyarrow >= 21, not >= 24, so the machine's own pyarrow
# will do and the 50 MB pyarrow wheel stays home.
WHEELS=(
  trl==1.16.0
  datasets==4.7.0 dill==0.4.0 multiprocess==0.70.18
  hjson==3.1.0
  pydantic==2.14.4 annotated-types==0.7.0 typing-inspection==0.4.5 typing-extensions==4.16.0
  math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2
)

prepare() {
  local exclude
  exclude=$(git rev-parse --git-path info/exclude)
  mkdir -p "$(dirname "$exclude")" .whl
  grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
  local plat=()
  for p in "${PLATFORMS[@]}"; do plat+=(--platform "$p"); done
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
    --implementation cp "${plat[@]}" -d .whl "${WHEELS[@]}"
  # pydantic 2.14 needs typing-extensions >= 4.16 and typing-inspection >= 0.4.4, newer than a
  # GPU machine may hold: both are carried (pure Python, backward compatible).
  # pydantic-core must match pydantic exactly: ask pydantic's metadata for the pin.
  local core
  core=$(unzip -p .whl/pydantic-2.14.4-*.whl '*/METADATA' | sed -n 's/^Requires-Dist: pydantic-core==\([0-9.]*\).*/\1/p' | head -1)
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
    --implementation cp "${plat[@]}" -d .whl "pydantic-core==${core}"
  # DeepSpeed is sdist-only on PyPI; it builds as pure Python (ops are JIT-compiled on the GPU).
  DS_BUILD_OPS=0 python3 -m pip wheel --quiet --no-deps -w .whl deepspeed==0.19.8
  # datasets needs pyarrow >= 24; the image's may be older. 50 MB: only when asked.
  if [ "${WITH_PYARROW:-0}" = 1 ]; then
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
      --implementation cp "${plat[@]}" -d .whl pyarrow==25.0.1
  fi
  du -sh .whl
  ls .whl
}

check() {
  if [ ! -d .whl ]; then
    echo "no .whl/ here: run 'scripts/device-check.sh prepare' where PyPI is reachable and carry .whl" >&2
    exit 2
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD/jobs${PYTHONPATH:+:$PYTHONPATH}"
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  export MLFLOW_DISABLE_TELEMETRY=true PYTHONUNBUFFERED=1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python3 -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "transformers", transformers.__version__)'
  python3 - <<'PY'
import sys

import pyarrow

major = int(pyarrow.__version__.split(".")[0])
print("pyarrow", pyarrow.__version__)
if major < 21:
    sys.exit("datasets 4.7 needs pyarrow >= 21: rerun 'WITH_PYARROW=1 scripts/device-check.sh prepare'")
PY
  # DeepSpeed wants a process group even for one GPU: torchrun provides it.
  python3 -m torch.distributed.run --standalone --nproc_per_node=1 \
    -m visionr1_jobs.training.device_check "$@"
}

case "${1:-}" in
  prepare) prepare ;;
  *) check "$@" ;;
esac
