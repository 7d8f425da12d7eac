#!/usr/bin/env bash
# GPU benchmark (issue 7): one script for a machine with an NVIDIA GPU. It installs the Python
# packages the GPU image lacks from carried wheels (.whl/, no index), checks nvidia-smi, and runs
# bench/gpu_bench.py, which prints the plans and, last, one table: tokens/s, MFU and peak memory of
# SmolLM2-135M, the 1B Llama and MiniLM (plain loop: eager / checkpointing / torch.compile), of
# `shardtune launch --strategy single_gpu|zero2|zero3|fsdp --gpus 1` on the 1B model and of `shardtune
# train`, each against `shardtune plan`'s memory estimate and predicted tokens/s (plan_time, this GPU type). Sized to finish in under 8 minutes on one
# H200 (--budget 420 s for the arms; an arm that fails or times out is a row with its error), after
# bench/strategy_matrix.py --device gpu (every strategy vs one process over 20 steps, NCCL, bf16; about 3 min).
#
#   bash bench/gpu.sh                  # on the GPU machine, from anywhere
#   bash bench/gpu.sh --cpu-check      # here, on CPU: configs + plans + table rows; no pip, no CUDA
#   bash bench/gpu.sh --arms loop,launch --budget 300    # any gpu_bench.py option passes through
#
# The device image (Python 3.12, torch, transformers, accelerate, tokenizers, safetensors, pyyaml)
# has no pydantic (shardtune's config) and no deepspeed (ZeRO arms). Fill .whl/ here, once, from the
# repo root (.whl/ is git-ignored, so name it in the device tool's `carry`):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
#     pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
#     typing-extensions==4.16.0 hjson==3.1.0
#   python3 -m pip wheel --no-deps -w .whl deepspeed==0.19.8   # sdist only on PyPI: a pure-Python wheel, ops JIT-built if ever used
#
# (about 5 MiB). datasets, wandb and gguf are not needed by any arm: the configs read a local JSONL
# (shardtune reads local files without `datasets`), report to nothing, and build models from configs.
# Device tool call: run(command="bash bench/gpu.sh", carry=[".whl"], timeout_s=540).
set -euo pipefail
cd "$(dirname "$0")/.."

cpu_check=0
for arg in "$@"; do [ "$arg" = "--cpu-check" ] && cpu_check=1; done
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled PYTHONUNBUFFERED=1

if [ "$cpu_check" = 1 ]; then
    py=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
    exec "$py" bench/gpu_bench.py "$@"
fi

py=${PYTHON:-python3}
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L; then
    echo "gpu.sh: no NVIDIA GPU here (nvidia-smi missing or failing); run it on the GPU machine, or use --cpu-check." >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv

site=${SITE:-/tmp/site}
if compgen -G ".whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
    export PYTHONPATH="$site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "gpu.sh: no wheels in .whl/ (see this script's header); using the image's packages only." >&2
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi

"$py" - <<'EOF'
import importlib, sys
need = ["torch", "transformers", "accelerate", "tokenizers", "safetensors", "yaml", "pydantic"]
want = ["deepspeed"]  # only the ZeRO arms need it; they fail in the table without it
found, missing = {}, []
for name in need + want:
    try:
        found[name] = getattr(importlib.import_module(name), "__version__", "?")
    except Exception as exc:
        missing.append(f"{name} ({type(exc).__name__}: {exc})")
print("python", sys.version.split()[0], " ".join(f"{k} {v}" for k, v in found.items()), flush=True)
import torch
if not torch.cuda.is_available():
    sys.exit("gpu.sh: torch sees no CUDA device; run it on the GPU machine.")
if missing:
    print("gpu.sh: missing: " + "; ".join(missing) + " -- fill .whl/ as this script's header says.", file=sys.stderr)
    if any(m.split()[0] in need for m in missing):
        sys.exit(2)
EOF

# the strategy matrix with NCCL and bf16 (bench/strategy_matrix.py: 2 GPUs where there are, else 1 process each);
# about 3 minutes on one H200; its table comes first, gpu_bench's last
"$py" bench/strategy_matrix.py --device gpu --steps 20 || echo "gpu.sh: the strategy matrix reported a failure (table above)" >&2

# the device mesh with NCCL and bf16 (issue 22): every mesh's held-out loss against the one-GPU run's, SmolLM2 on the
# Python docs; it needs 4 GPUs (a 4-rank mesh cannot share GPUs under NCCL), so one lent GPU skips it
gpus=$(nvidia-smi -L | wc -l)
if [ "$gpus" -ge 4 ]; then
    "$py" bench/mesh_quality.py --model smollm2-135m --gpus 4 --steps 100 || echo "gpu.sh: the mesh check reported a failure (table above)" >&2
else
    echo "gpu.sh: $gpus GPU(s): the mesh check (bench/mesh_quality.py --gpus 4) needs 4; skipped" >&2
fi

out=${OUT:-runs/gpu-bench-$(date +%Y%m%d-%H%M%S)}
exec "$py" bench/gpu_bench.py --out "$out" "$@"
