#!/usr/bin/env bash
# Issue 13's device checks in one run, everything in one log ($OUT/gpu_suite.log, plus JSON next to it):
#   1. our SCott and LCM train steps at SD1.5 shapes (random weights), 512 px, batch 10, bfloat16 compute,
#      attention auto (cuDNN), remat: step time, images/s, MFU (FLOPs of benchmarks/flops_sd15.json, counted on a
#      CPU by benchmarks/train_step.py --flops lowered for exactly these shapes), XLA memory analysis, device peak;
#   2. the PyTorch peer (benchmarks/peer_lcm_torch.py: the LCD step of diffusers' consistency-distillation
#      example), same batch and resolution, bf16 autocast, torch.compile off and on;
#   3. sampling: 1 / 2 / 4-step 512 px student images/s, ours (bfloat16, cuDNN attention) vs diffusers'
#      LatentConsistencyModelPipeline (float16) (benchmarks/sampling.py --half);
#   4. the compiled memory analysis of the SCott step at larger batches (which fits) and at batch 10 without remat.
# Each piece has a time limit, and a piece starts only if the suite's budget (SUITE_BUDGET_S, default 460 s) has
# room for it, so the whole run stays under 8 minutes on one H100 / H200.
#
#   bash benchmarks/gpu_suite.sh                     # on the device (carry .whl: diffusers, grain, ml_collections)
#   SUITE_SIZE=tiny SUITE_WHEELS=none SUITE_BUDGET_S=2400 SUITE_LIMIT_SCALE=4 PYTHON=.venv/bin/python \
#     bash benchmarks/gpu_suite.sh
#                                                    # the same pieces at tiny size on a CPU
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_suite}
mkdir -p "$OUT"
LOG=$OUT/gpu_suite.log
SIZE=${SUITE_SIZE:-sd15}
BUDGET=${SUITE_BUDGET_S:-460}
SCALE=${SUITE_LIMIT_SCALE:-1}  # multiplies each piece's time limit (a slow CPU at tiny size)
START=$(date +%s)
export PYTHONUNBUFFERED=1
WHEELS=${SUITE_WHEELS:-.whl}  # SUITE_WHEELS=none: use the Python environment as it is (e.g. a local venv)
if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
    || { echo "wheel install failed" | tee -a "$LOG"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
PY=${PYTHON:-python3}

log() { echo "$*" | tee -a "$LOG"; }

# piece NAME LIMIT_S MIN_S COMMAND...: runs COMMAND (stdout and stderr into the log) under LIMIT_S, or skips it
# when less than MIN_S of the budget is left.
piece() {
  local name=$1 limit=$(( $2 * SCALE )) need=$3
  shift 3
  local used=$(( $(date +%s) - START ))
  local left=$(( BUDGET - used ))
  if [ "$left" -lt "$need" ]; then
    log "## $name: SKIPPED (${left} s of the budget left, needs ${need} s)"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  log "## $name (limit ${limit} s, at ${used} s): $*"
  local t0=$(date +%s)
  timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | grep -v "should be kept in float32" | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  log "## $name: exit $rc after $(( $(date +%s) - t0 )) s"
}

log "# gpu_suite ($SIZE) $(date -u +%FT%TZ) on $(hostname); budget ${BUDGET} s; git $(git rev-parse --short HEAD 2>/dev/null)"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$LOG"
$PY -c "import jax, torch, flax, diffusers; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__, \
torch.cuda.is_available(), '| flax', flax.__version__, '| diffusers', diffusers.__version__)" 2>&1 | tee -a "$LOG"

if [ "$SIZE" = sd15 ]; then
  B=10; R=512; OURS_DTYPE=bfloat16; PEER_DTYPE=bfloat16; SB=4; HALF=--half; GPU=--gpu; REP=5
  FLOPS=(--flops_json benchmarks/flops_sd15.json); BATCHES=(16 24); COMPILE=(off on); LIMIT=()
else  # tiny, on a CPU: the same pieces, small shapes
  B=2; R=32; OURS_DTYPE=bfloat16; PEER_DTYPE=float32; SB=2; HALF=--half; GPU=""; REP=2
  FLOPS=(--flops lowered); BATCHES=(4); COMPILE=(off); LIMIT=(--memory_limit_gib 80)
fi
COMMON=(--size "$SIZE" --batch "$B" --resolution "$R" --dtype "$OURS_DTYPE" --attention auto --remat)

piece "ours: SCott and LCM steps" 240 60 $PY benchmarks/train_step.py "${COMMON[@]}" --kinds scott,lcm \
  --repeats "$REP" "${FLOPS[@]}" --json "$OUT/train_step.json"
piece "peer: PyTorch LCD step" 200 60 $PY benchmarks/peer_lcm_torch.py --size "$SIZE" --batch "$B" --resolution "$R" \
  --dtype "$PEER_DTYPE" --compile "${COMPILE[@]}" --repeats "$REP" --warmup 2 --json "$OUT/peer.json"
piece "sampling: ours vs LatentConsistencyModelPipeline" 120 60 $PY benchmarks/sampling.py --only "$SIZE" \
  --resolution "$R" --batch "$SB" --steps 1 2 4 --repeats 3 $GPU $HALF
piece "memory: SCott at larger batches (compile only)" 150 50 $PY benchmarks/train_step.py "${COMMON[@]}" \
  --kinds scott --no-time --no-flops --max_batch "${BATCHES[@]}" "${LIMIT[@]}" --json "$OUT/max_batch.json"
piece "memory: SCott batch $B without remat (compile only)" 100 40 $PY benchmarks/train_step.py --size "$SIZE" \
  --batch "$B" --resolution "$R" --dtype "$OURS_DTYPE" --attention auto --kinds scott --no-time --no-flops \
  --max_batch "$B" "${LIMIT[@]}" --json "$OUT/no_remat.json"

$PY - "$OUT" <<'EOF' 2>&1 | tee -a "$LOG"
"""Summary: ours vs the peer (LCM step), MFU, memory."""
import json, os, sys
out = sys.argv[1]
def load(name):
  p = os.path.join(out, name)
  return json.load(open(p)) if os.path.exists(p) else []
ours = {r["kind"]: r for r in load("train_step.json") if "kind" in r}
peer = load("peer.json")
for k, r in ours.items():
  if "step_s" in r:
    mfu = f", MFU {100 * r['mfu']:.1f}%" if "mfu" in r else ""
    print(f"summary: ours {k}: {1e3 * r['step_s']:.1f} ms/step, {r['images_per_s']:.2f} images/s{mfu}, "
          f"{r['flop_ratio']:.2f} forward-equivalents (FLOPs), wall ratio {r['wall_ratio']:.1f}, "
          f"XLA peak estimate {r['memory'].get('peak_estimate_bytes', 0) / 2**30:.2f} GiB, "
          f"device peak {r['device_peak_bytes'] / 2**30:.2f} GiB")
for p in peer:
  line = f"summary: peer LCM (torch.compile {'on' if p['compile'] else 'off'}): {1e3 * p['step_s']:.1f} ms/step"
  if "lcm" in ours and "step_s" in ours["lcm"]:
    line += f"; ours-LCM / peer-LCM = {ours['lcm']['step_s'] / p['step_s']:.2f} (goal <= 0.7)"
    if "peak_flops" in ours["lcm"]:
      line += f"; peer MFU {100 * ours['lcm']['model_flops'] / p['step_s'] / ours['lcm']['peak_flops']:.1f}%"
  print(line)
for name in ("max_batch.json", "no_remat.json"):
  for r in load(name):
    for m in r.get("max_batch", []):
      print(f"summary: {name[:-5]}: {m['kind']} batch {m['batch']}: XLA peak estimate "
            f"{m['memory'].get('peak_estimate_bytes', 0) / 2**30:.2f} GiB, fits: {m['fits']}")
EOF
log "# gpu_suite done in $(( $(date +%s) - START )) s"
