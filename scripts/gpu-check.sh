#!/usr/bin/env bash
# Single-GPU checks of the GPU code paths (tests/gpu/, pytest marker `gpu`): the memory plan's
# activation estimate against CUDA SDPA, fingerprints of device tensors, an NCCL broadcast of a
# bucket with its time-out, a bf16 ZeRO-3 step with checkpointing and fp32 gradient
# accumulation (needs DeepSpeed), a frozen model split over 2 GPUs (needs 2). Skipped, each with
# its reason, where CUDA or a library is missing. Run from the repository root, in an
# environment with this package's dependencies (the GPU image, or .venv on a GPU machine):
#   bash scripts/gpu-check.sh            # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$PY" - <<'PY'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "GPUs", torch.cuda.device_count())
for name in ("transformers", "deepspeed", "vllm", "ray"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as err:  # report, do not fail: the tests skip what they cannot run
        print(name, "missing:", type(err).__name__)
PY
exec "$PY" -m pytest -q -m gpu -rs tests/gpu "$@"
