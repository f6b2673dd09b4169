#!/usr/bin/env bash
# GPU smoke run and timings (issue 6), one short script for a machine with one CUDA GPU (≤ 5 minutes):
#  1. DRaFT-K (K=2) step of an SD1.5-shaped model at 512², bf16-mixed, batch 1 and 4, checkpointing on/off;
#  2. the same step in 16-mixed (GradScaler path), batch 1;
#  3. fnf vs the hand-written loop on CUDA, where max_memory_allocated is an exact memory probe;
#  4. the same step under Lightning's FSDPStrategy (FSDP1; 1 GPU; torch's FSDP1 refuses CPU devices, so only here);
#  5. the same step under ModelParallelStrategy (FSDP2, fnf/sharding.py; 2 CPU processes in tests/test_fsdp.py).
# Usage: bash benchmarks/gpu_smoke.sh [python]   (fnf importable: installed, or run from the repo root)
set -euo pipefail
PY=${1:-python}
LOG=${LOG:-/dev/stderr}  # Lightning/diffusers chatter goes here; the tables go to stdout
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$(pwd) PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" benchmarks/sd15_step.py --model-dir /tmp/sd15-shaped --precision bf16-mixed --batch 1 4 --checkpointing per_step off 2>>"$LOG"
"$PY" benchmarks/sd15_step.py --model-dir /tmp/sd15-shaped --precision 16-mixed --batch 1 --checkpointing per_step 2>>"$LOG" | tail -1
"$PY" benchmarks/speed.py --device cuda --quick --ratio-only --latent-side 32 2>>"$LOG"
"$PY" benchmarks/sd15_step.py --model-dir /tmp/sd15-shaped --strategy fsdp --batch 1 --checkpointing per_step 2>>"$LOG" | tail -1
"$PY" benchmarks/sd15_step.py --model-dir /tmp/sd15-shaped --strategy fsdp2 --batch 1 --checkpointing per_step 2>>"$LOG" | tail -1
