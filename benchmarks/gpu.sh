#!/usr/bin/env bash
# The issue-7 figures on one GPU, in about 5 minutes (prepared for an H200; run from
# the repository root):
#     bash benchmarks/gpu.sh            # JSON under $OUT, else benchmarks/results/gpu/
# Time limits: 110 s (float32 steps) + 70 s (bf16) + 90 s (paper iteration) = 270 s,
# plus the start-up (wheels, imports, CUDA); each measurement is a fresh process. The
# step sweeps start at the paper batch, so it comes back even if a sweep is cut; a
# sweep cut short keeps the rows it finished (grad_step --rows). The script exits 1
# if summary.json lacks any measurement.
# Records: action sampling for 1,000 histories and the paper-size gradient step at
# minibatch 4,096 and 256 in float32, the sampling and the step at 4,096 with bfloat16
# matmuls; the paper configuration's stages (a rollout of 1,000 envs x 10 steps with
# the shipped reward model, one update of batch 4,096, and a fused call with 8 of an
# iteration's 64 updates to check that they run together), and from the stages the
# projected time of a paper run (1e8 transitions, 640k updates of batch 4,096;
# benchmarks/train_throughput.py). That part runs the agent networks at JAX's GPU
# default (TF32 matmuls), as `caasl train` would.
#
# Precision: `--matmul-precision bfloat16` makes the policy's and critics' matmuls
# single bf16 passes with float32 accumulation; parameters, Adam state, soft-target
# updates (tau = 1e-3), softmax, LayerNorm and tanh-Gaussian log-probs stay float32.
# That is safe for the agent networks. The AVICI reward stays float32 under any
# default (`reward.model.edge_probs` multiplies in full float32): step rewards are
# differences of ~0.1 between sums of 100 edge probabilities, which bf16 rounding
# (~4e-3 relative per product) would blur.
# Packages the GPU image lacks (distrax and its tfp-nightly, tensorboardX) travel as
# wheels in .whl/: make them here with `bash scripts/gpu_wheels.sh` and carry ".whl";
# they are installed when present (scripts/gpu_site.sh).
#
# QUICK=1 runs the same pipeline at toy counts (a smoke test of this script on a CPU).
set -euo pipefail
OUT_DIR=${OUT:-benchmarks/results/gpu}
if [[ "${QUICK:-0}" == 1 ]]; then
  F32_BATCHES="8 4"; BF16_BATCHES="8"; ACT=16; F32_LIMIT=300; BF16_LIMIT=300; TRAIN_LIMIT=400
  TRAIN_SETS=(--set num_envs=8 --set batch_size=8 --set updates_per_iteration=1
              --set warmup_episodes=8 --set replay_episodes=64)
else
  F32_BATCHES="4096 256"; BF16_BATCHES="4096"; ACT=1000
  F32_LIMIT=110; BF16_LIMIT=70; TRAIN_LIMIT=90
  TRAIN_SETS=(--set warmup_episodes=1000 --set replay_episodes=100000
              --set updates_per_iteration=8)
fi
mkdir -p "$OUT_DIR"
source scripts/gpu_site.sh

measure_steps() {  # precision, batches (the first is also the device-sweep batch), limit
  local precision=$1 batches=$2 limit=$3
  rm -f "$OUT_DIR/grad_step_$precision.rows.jsonl"
  # shellcheck disable=SC2086
  timeout "$limit" python3 -m benchmarks.grad_step --batch-sizes $batches --devices 1 \
    --device-batch "${batches%% *}" --act-histories "$ACT" --matmul-precision "$precision" \
    --repeats 5 --rows "$OUT_DIR/grad_step_$precision.rows.jsonl" \
    > "$OUT_DIR/grad_step_$precision.json" || echo "grad_step $precision failed or timed out"
}
measure_steps float32 "$F32_BATCHES" "$F32_LIMIT"
measure_steps bfloat16 "$BF16_BATCHES" "$BF16_LIMIT"

timeout "$TRAIN_LIMIT" python3 -m benchmarks.train_throughput --config linear-d10 --calls 1 \
  --repeats 1 --set iterations_per_call=1 "${TRAIN_SETS[@]}" \
  > "$OUT_DIR/train_paper.json" || echo "train_throughput failed or timed out"

python3 - "$OUT_DIR" "$F32_BATCHES" "$BF16_BATCHES" <<'PY'
import json, sys
from caasl_jax.jsonl import read_rows  # skips a line torn by the time limit
from pathlib import Path
out = Path(sys.argv[1])
wanted = {"float32": sys.argv[2], "bfloat16": sys.argv[3]}
summary, missing = {}, []
for prec, batches in wanted.items():
    rows_path = out / f"grad_step_{prec}.rows.jsonl"  # every finished row, even if cut short
    rows = read_rows(rows_path)
    steps = {r["batch"]: r["seconds"] for r in rows if r["what"] == "update" and r["devices"] == 1}
    act = [r for r in rows if r["what"] == "act"]
    summary[prec] = {"grad_step_s": steps}
    if act:
        summary[prec]["act"] = {"histories": act[0]["batch"], "seconds": act[0]["seconds"]}
    missing += [f"{prec} act"] * (not act)
    missing += [f"{prec} step B={b}" for b in map(int, batches.split()) if b not in steps]
path = out / "train_paper.json"
if path.exists() and path.stat().st_size:
    r = json.loads(path.read_text())["results"][0]
    summary["rollout_s"] = r["rollout"]["seconds"]  # 1,000 envs x 10 steps, with rewards
    summary["update_s"] = r["update"]["seconds"]  # one REDQ update of batch 4,096
    summary["projected_paper_run_hours"] = r["projected_paper_run_hours_single_device"]
    summary["goal_hours"] = 8
    summary["fused_call"] = r["fused"]  # 8 updates per iteration; updates_ran must be true
else:
    missing.append("paper iteration")
summary["missing"] = missing
(out / "summary.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary, indent=2))
sys.exit(1 if missing else 0)
PY
