#!/usr/bin/env bash
# The main-job demo, from a fresh clone: set up .venv, write the synthetic dataset, train a tiny CLIP
# on CPU for a few minutes, evaluate it and print a results table and the path of a plot.
#   bash tools/demo.sh                 (re-running skips the set-up and data steps already done)
# Environment knobs: VENV (default .venv), DEMO_DIR (default demo), DEMO_SAMPLES, DEMO_EPOCHS,
# DEMO_BATCH, DEMO_WORKERS, DEMO_MODEL, DEMO_LR, DEMO_THREADS.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
DEMO_DIR=${DEMO_DIR:-demo}
SAMPLES=${DEMO_SAMPLES:-20000}
EPOCHS=${DEMO_EPOCHS:-5}
BATCH=${DEMO_BATCH:-128}
WORKERS=${DEMO_WORKERS:-1}
MODEL=${DEMO_MODEL:-tiny-rn}
LR=${DEMO_LR:-2e-3}
export PIP_DISABLE_PIP_VERSION_CHECK=1

t_start=$(date +%s)
# (a) environment: only what is missing
if ! { [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import pyprotoclip.train, pyprotoclip.data, open_clip" 2>/dev/null; }; then
  echo "== [demo] setting up $VENV (torch 2.14.1, pyprotoclip editable)"
  VENV="$VENV" PYPROTOCLIP_CUDA=${PYPROTOCLIP_CUDA:-0} bash tools/setup.sh
else
  echo "== [demo] $VENV already has pyprotoclip: skipping set-up"
fi
PY="$VENV/bin/python"
# the training process uses the cores; data workers get their own processes
export OMP_NUM_THREADS=${DEMO_THREADS:-$(nproc)}

# (b) data
DATA="$DEMO_DIR/data"
if [ -f "$DATA/info.json" ] && "$PY" - "$DATA" "$SAMPLES" <<'EOF'
import json, sys
info = json.load(open(f"{sys.argv[1]}/info.json"))
sys.exit(0 if info.get("counts", {}).get("train", info.get("num_train")) == int(sys.argv[2]) else 1)
EOF
then
  echo "== [demo] $DATA already holds $SAMPLES training samples: skipping generation"
else
  echo "== [demo] writing the synthetic dataset ($SAMPLES training samples) to $DATA"
  "$PY" -m pyprotoclip data synthetic --out "$DATA" --num-samples "$SAMPLES"
fi
read -r TRAIN VAL < <("$PY" -c "import json; i = json.load(open('$DATA/info.json')); print(i['train_shards'], i['val_shards'])")

# (c) train (a fresh run each time)
NAME=demo-$MODEL
rm -rf "$DEMO_DIR/logs/$NAME"
echo "== [demo] training $MODEL on CPU: $EPOCHS epochs x $SAMPLES samples, batch $BATCH"
t_train=$(date +%s)
"$PY" -m pyprotoclip train --train-data "$TRAIN" --val-data "$VAL" --model "$MODEL" \
  --batch-size "$BATCH" --epochs "$EPOCHS" --lr "$LR" --wd 0.1 --warmup 100 --precision fp32 --device cpu \
  --workers "$WORKERS" --log-every-n-steps 20 --zeroshot-frequency 1 --save-frequency "$EPOCHS" \
  --logs "$DEMO_DIR/logs" --name "$NAME" --seed 0
train_s=$(( $(date +%s) - t_train ))

# (d) evaluate
CKPT="$DEMO_DIR/logs/$NAME/checkpoints/epoch_$EPOCHS.pt"
echo "== [demo] evaluating $CKPT on the validation split"
"$PY" -m pyprotoclip eval --checkpoint "$CKPT" --data "$VAL" --workers "$WORKERS" --device cpu
"$PY" - "$DEMO_DIR/logs/$NAME/results.jsonl" "$train_s" "$t_start" <<'EOF'
import json, sys, time
rows = [json.loads(line) for line in open(sys.argv[1])]
s = [r for r in rows if r["type"] == "summary"][-1]
print(f"training: {s['step']} steps in {int(sys.argv[2])} s (wall, incl. start-up and per-epoch validation); "
      f"{s['samples_per_s']:.0f} samples/s ({s['samples_per_s_per_device']:.0f}/s per process); "
      f"data loading {100 * s['data_fraction']:.1f}% of step time")
print(f"demo wall time: {time.time() - int(sys.argv[3]):.0f} s")
EOF
