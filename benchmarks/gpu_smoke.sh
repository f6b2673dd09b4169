#!/usr/bin/env bash
# GPU measurements of the training step's speed levers (issue 12) and of SD3.5- / FLUX.1-shaped steps (issue 15), one
# script for a machine with one CUDA GPU
# (each part has its own time limit, in order of importance, so a slow part cannot eat the rest; the limits add up to
# 600 s, the device tool's limit per command; run it with timeout_s 600; a part prints each table row as it finishes,
# so a part that reaches its limit keeps the rows it finished and says "(part stopped"):
#  1. SD1.5-shaped 512², bf16-mixed, 50 DDIM steps, K=2, batch 1: the step as before the levers, all levers, and
#     plain DRaFT with all levers (the cost of region awareness = all / draft);
#  2. tests/test_device_syncs.py: the sampling passes under torch.cuda.set_sync_debug_mode("error") (needs pytest);
#  3. each lever alone, batch 1;  4. batch 4 and 8: before vs all (images/s);
#  5. torch.profiler of one all-levers step: CPU vs GPU time, top ops;
#  6. all levers + torch.compile (regional) and + CUDA graphs, batch 1 (first-step time = compile time);
#  7. the hand-written loop on the same GPU and model (benchmarks/speed.py), equal work;
#  8. SDXL-shaped 1024², batch 1, all levers;
#  9. SD3.5-Medium-shaped 1024² (MMDiT-X 2.2 B, CLIP-L + bigG, no T5: 256 zero tokens of width 4096 in its place, the
#     same transformer compute), 40 steps, CFG 4.5, batch 1: before the levers and all levers;
# 10. FLUX.1-dev-shaped 1024² with 4 + 8 of its 19 + 38 blocks (and 2 + 4, the same weights truncated), 28 steps,
#     embedded guidance 3.5, batch 1, all levers: the step and the per-block cost, extrapolated to 19 + 38 blocks
#     (an estimate).
# Parts 8-10 build random models of 3-3.5 B parameters first (on the GPU, saved in bf16); if a part stops at its limit,
# run it alone, e.g.:
#   python benchmarks/sd15_step.py --family sd3 --model-dir /tmp/sd3-shaped --batch 1 --variants before all
# Parts 9 and 10 were added after parts 1-8 were sized; to keep the total at 600 s, parts 1-7 were trimmed from
# 150/50/115/90/40/70/40 s to 120/35/90/75/30/50/30 s (every limit is a guess from the earlier H200 step times, none
# checked with the levers yet: each part prints the seconds it took, to size them). A part is killed 2 s after its
# limit, and none runs past BUDGET (590 s) from the start, so the script ends inside the device tool's 600 s.
# Earlier smoke steps (16-mixed, FSDP1, FSDP2) stay available, past the 600 s: SMOKE_FSDP=1 BUDGET=720 bash ...
# Usage: bash benchmarks/gpu_smoke.sh [python]   (fnf importable: installed, or run from the repo root)
set -uo pipefail
PY=${1:-python}
LOG=${LOG:-/dev/stderr}  # Lightning/diffusers chatter goes here; the tables go to stdout
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$(pwd) PYTHONUNBUFFERED=1
# DRY=1: a CPU dry run of every part on tiny models (checks the script, not the GPU: the part limits apply, BUDGET not)
TINY=${DRY:+--small --device cpu --num-steps 3}
DEVICE=cuda; STEPS=50; [ -n "${DRY:-}" ] && DEVICE=cpu STEPS=3
STEP="$PY benchmarks/sd15_step.py --model-dir /tmp/sd15-shaped${DRY:+-tiny} --precision bf16-mixed --checkpointing per_step $TINY"
BUDGET=${BUDGET:-${DRY:+86400}}; BUDGET=${BUDGET:-590}  # s from the start: no part runs past it (10 s of the 600 spare)
DEADLINE=$((SECONDS + BUDGET))
part() {  # SIGKILL 2 s after the limit: Lightning defers SIGTERM to the end of a step, which can take minutes
  local limit=$1 start=$SECONDS; shift; echo -e "\n## $*" | cut -c1-300
  (( limit > DEADLINE - SECONDS - 2 )) && limit=$((DEADLINE - SECONDS - 2))
  if (( limit <= 0 )); then echo "(part skipped: the $BUDGET s budget is spent)"; return; fi
  timeout -k 2 "$limit" "$@" 2>>"$LOG" || echo "(part stopped: exit $?)"
  echo "(part took $((SECONDS - start)) s of its $limit s)"
}
[ -n "${DRY:-}" ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch, diffusers, peft, lightning; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__, 'lightning', lightning.__version__)"
part 120 $STEP --batch 1 --steps 3 --variants before all draft
part 35 "$PY" -m pytest -q -p no:cacheprovider tests/test_device_syncs.py
part 90 $STEP --batch 1 --steps 2 --variants fused fold fold_grad inference frozen layout no_ckpt
part 75 $STEP --batch 4 8 --steps 2 --variants before all
part 30 $STEP --batch 1 --steps 1 --variants all --profile 12
part 50 $STEP --batch 1 --steps 2 --variants all+compile all+graphs
part 30 "$PY" benchmarks/speed.py --model /tmp/sd15-shaped${DRY:+-tiny} --device $DEVICE --quick --ratio-only \
  --repeats 1 --num-steps $STEPS --batch 1
part 45 $STEP --sdxl --model-dir /tmp/sdxl-shaped${DRY:+-tiny} --batch 1 --steps 1 --variants all
part 75 $STEP --family sd3 --model-dir /tmp/sd3-shaped${DRY:+-tiny} --batch 1 --steps 1 --variants before all
part 50 $STEP --family flux --flux-blocks 4 8 --model-dir /tmp/flux-shaped${DRY:+-tiny} --batch 1 --steps 1 \
  --variants all
if [ "${SMOKE_FSDP:-0}" = 1 ]; then
  part 60 $STEP --strategy fsdp --batch 1 --variants before
  part 60 $STEP --strategy fsdp2 --batch 1 --variants before
fi
