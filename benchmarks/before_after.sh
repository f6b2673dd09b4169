#!/usr/bin/env bash
# The main job's fit time at two revisions, runs alternating (old, new, old, new, ...) on this machine:
# "the CPU path must not get slower" (issue 12). Each revision runs from its own git worktree with its own
# configs/artifacts.yaml, through this checkout's .venv (PYTHONPATH puts the worktree's fnf first).
# Usage: bash benchmarks/before_after.sh OLD_REV [NEW_REV] [RUNS] [extra `fnf fit` arguments...]
#   bash benchmarks/before_after.sh 47f6e48 HEAD 2 --trainer.max_steps 30
set -euo pipefail
OLD=$1 NEW=${2:-HEAD} RUNS=${3:-2}; shift $(( $# < 3 ? $# : 3 ))
PY=$(pwd)/.venv/bin/python
TMP=$(mktemp -d)
trap 'git worktree remove --force "$TMP/old" 2>/dev/null; git worktree remove --force "$TMP/new" 2>/dev/null; rm -rf "$TMP"' EXIT
git worktree add -q --detach "$TMP/old" "$OLD"
git worktree add -q --detach "$TMP/new" "$NEW"
echo "| run | revision | fit s |"
echo "|---|---|---|"
for run in $(seq 1 "$RUNS"); do
  for side in old new; do
    rev=$([ $side = old ] && echo "$OLD" || echo "$NEW")
    start=$(date +%s.%N)
    (cd "$TMP/$side" && PYTHONPATH="$TMP/$side" "$PY" -m fnf.cli fit --config configs/artifacts.yaml \
      --trainer.default_root_dir "$TMP/runs-$side-$run" --trainer.enable_progress_bar false "$@" > "$TMP/$side-$run.log" 2>&1) \
      || { echo "fit failed at $rev:"; tail -5 "$TMP/$side-$run.log"; exit 1; }
    echo "| $run | $rev ($(git rev-parse --short "$rev")) | $(echo "$(date +%s.%N) - $start" | bc -l | xargs printf %.1f) |"
  done
done
