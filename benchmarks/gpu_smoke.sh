#!/usr/bin/env bash
# GPU measurements of the training step's speed levers (issue 12), one script for a machine with one CUDA GPU
# (each part has its own time limit, in order of importance, so a slow part cannot eat the rest; the limits add up to
# 600 s, the device tool's limit per command; run it with timeout_s 600):
#  1. SD1.5-shaped 512², bf16-mixed, 50 DDIM steps, K=2, batch 1: the step as before the levers, all levers, and
#     plain DRaFT with all levers (the cost of region awareness = all / draft);
#  2. tests/test_device_syncs.py: the sampling passes under torch.cuda.set_sync_debug_mode("error") (needs pytest);
#  3. each lever alone, batch 1;  4. batch 4 and 8: before vs all (images/s);
#  5. torch.profiler of one all-levers step: CPU vs GPU time, top ops;
#  6. all levers + torch.compile (regional) and + CUDA graphs, batch 1 (first-step time = compile time);
#  7. the hand-written loop on the same GPU and model (benchmarks/speed.py), equal work;
#  8. SDXL-shaped 1024², batch 1, all levers (building the 3.5 B-parameter random model may not fit the limit: then
#     run it alone: python benchmarks/sd15_step.py --sdxl --model-dir /tmp/sdxl-shaped --batch 1 --variants before all).
# Earlier smoke steps (16-mixed, FSDP1, FSDP2) stay available: SMOKE_FSDP=1 bash benchmarks/gpu_smoke.sh
# Usage: bash benchmarks/gpu_smoke.sh [python]   (fnf importable: installed, or run from the repo root)
set -uo pipefail
PY=${1:-python}
LOG=${LOG:-/dev/stderr}  # Lightning/diffusers chatter goes here; the tables go to stdout
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$(pwd) PYTHONUNBUFFERED=1
# DRY=1: a CPU dry run of every part on tiny models (checks the script, not the GPU)
TINY=${DRY:+--small --device cpu --num-steps 3}
DEVICE=cuda; STEPS=50; [ -n "${DRY:-}" ] && DEVICE=cpu STEPS=3
STEP="$PY benchmarks/sd15_step.py --model-dir /tmp/sd15-shaped${DRY:+-tiny} --precision bf16-mixed --checkpointing per_step $TINY"
part() { local limit=$1; shift; echo -e "\n## $*" | cut -c1-160; timeout "$limit" "$@" 2>>"$LOG" || echo "(part stopped: exit $?)"; }
[ -n "${DRY:-}" ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch, diffusers, peft, lightning; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__, 'lightning', lightning.__version__)"
part 150 $STEP --batch 1 --steps 3 --variants before all draft
part 50 "$PY" -m pytest -q -p no:cacheprovider tests/test_device_syncs.py
part 115 $STEP --batch 1 --steps 2 --variants fused fold frozen layout no_ckpt
part 90 $STEP --batch 4 8 --steps 2 --variants before all
part 40 $STEP --batch 1 --steps 1 --variants all --profile 12
part 70 $STEP --batch 1 --steps 2 --variants all+compile all+graphs
part 40 "$PY" benchmarks/speed.py --model /tmp/sd15-shaped${DRY:+-tiny} --device $DEVICE --quick --ratio-only \
  --repeats 1 --num-steps $STEPS --batch 1
part 45 $STEP --sdxl --model-dir /tmp/sdxl-shaped${DRY:+-tiny} --batch 1 --steps 1 --variants all
if [ "${SMOKE_FSDP:-0}" = 1 ]; then
  part 60 $STEP --strategy fsdp --batch 1 --variants before
  part 60 $STEP --strategy fsdp2 --batch 1 --variants before
fi
