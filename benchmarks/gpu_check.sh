#!/usr/bin/env bash
# The trainer at LLM scale on one GPU: one run of under 8 minutes that prints one table and ends in a RESULT line
# (samples/s and MFU of a 1B-class and a 7B-class decoder against stock transformers.Trainer; peak memory of full
# bf16 fine-tuning, LoRA with a bf16 base and QLoRA). See benchmarks/gpu_check.py for what each row measures.
#
#   bash benchmarks/gpu_check.sh           # on a machine with a CUDA GPU
#   bash benchmarks/gpu_check.sh --dry     # tiny models on the CPU: the script end to end, no GPU figures
#
# On a device machine without the project's virtualenv (python3 there has torch, transformers and peft, not
# pydantic or bitsandbytes), carry their wheels in .whl/ (ignored by git) and the script installs them first:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     bitsandbytes==0.50.2 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection   # ~46 MB
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
else
  PY=python3
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu-check-site \
      .whl/*.whl
    export PYTHONPATH="/tmp/gpu-check-site${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export PYTHONPATH="$PWD/operator:$PWD/trainer_image${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 470 "$PY" benchmarks/gpu_check.py "$@"
