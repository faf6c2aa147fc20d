#!/usr/bin/env bash
# The main-job demo, from a fresh clone: set up .venv, write the synthetic dataset, train a tiny CLIP and a
# tiny ProtoCLIP on CPU with the same sample budget, evaluate both, print the results side by side and
# draw their accuracy-vs-samples curves.
#   bash tools/demo.sh                 (re-running skips the set-up and data steps already done)
# Cost: 1296 s after set-up on an idle 2-core AMD EPYC (213 and 202 training samples/s; README.md); 2645 s with DEMO_THREADS=1 while
# another job held the other core. Training shows a tqdm bar on a terminal; when stdout is not a terminal
# (a log file, CI) it prints a line every 20 steps and a progress line with an ETA at least every ~30 s.
# Environment knobs: VENV (default .venv), DEMO_DIR (default demo), DEMO_METHODS (default "clip protoclip";
# "cyclip" also works), DEMO_SAMPLES, DEMO_EPOCHS, DEMO_BATCH, DEMO_WORKERS, DEMO_MODEL, DEMO_LR,
# DEMO_THREADS, DEMO_PROTOTYPES (ProtoCLIP's K), DEMO_TEACHER (ProtoCLIP's --external-teacher, e.g. default).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
DEMO_DIR=${DEMO_DIR:-demo}
METHODS=${DEMO_METHODS:-clip protoclip}
SAMPLES=${DEMO_SAMPLES:-20000}
EPOCHS=${DEMO_EPOCHS:-5}
BATCH=${DEMO_BATCH:-128}
WORKERS=${DEMO_WORKERS:-1}
MODEL=${DEMO_MODEL:-tiny-rn}
LR=${DEMO_LR:-2e-3}
PROTOTYPES=${DEMO_PROTOTYPES:-1000}
export PIP_DISABLE_PIP_VERSION_CHECK=1

t_start=$(date +%s)
# (a) environment: only what is missing
if ! { [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import pyprotoclip.train, pyprotoclip.data, open_clip" 2>/dev/null; }; then
  echo "== [demo] setting up $VENV (torch 2.14.1, pyprotoclip editable)"
  VENV="$VENV" bash tools/setup.sh
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

# (c) train and evaluate each method (a fresh run each time), same data, model, schedule and sample budget
runs=()
for METHOD in $METHODS; do
  NAME=demo-$METHOD
  EXTRA=()
  case "$METHOD" in
    protoclip) EXTRA=(--episode-size 0 --num-prototypes "$PROTOTYPES" --add-projection-head --PBT --infonce-warmup-epoch 1)
               if [ -n "${DEMO_TEACHER:-}" ]; then EXTRA+=(--external-teacher "$DEMO_TEACHER"); fi ;;
    cyclip) EXTRA=(--cylambda1 0.25 --cylambda2 0.25) ;;
  esac
  rm -rf "$DEMO_DIR/logs/$NAME"
  echo "== [demo] training $MODEL with --method $METHOD on CPU: $EPOCHS epochs x $SAMPLES samples, batch $BATCH"
  t_train=$(date +%s)
  "$PY" -m pyprotoclip train --train-data "$TRAIN" --val-data "$VAL" --model "$MODEL" --method "$METHOD" "${EXTRA[@]}" \
    --batch-size "$BATCH" --epochs "$EPOCHS" --lr "$LR" --wd 0.1 --warmup 100 --precision fp32 --device cpu \
    --workers "$WORKERS" --log-every-n-steps 20 --zeroshot-frequency 1 --save-frequency "$EPOCHS" \
    --logs "$DEMO_DIR/logs" --name "$NAME" --seed 0
  echo "== [demo] $METHOD: $(( $(date +%s) - t_train )) s of training (wall, incl. start-up and per-epoch validation)"
  CKPT="$DEMO_DIR/logs/$NAME/checkpoints/epoch_$EPOCHS.pt"
  echo "== [demo] evaluating $CKPT on the validation split"
  "$PY" -m pyprotoclip eval --checkpoint "$CKPT" --data "$VAL" --workers "$WORKERS" --device cpu
  runs+=("$DEMO_DIR/logs/$NAME")
done

# (d) side by side
echo "== [demo] results on the validation split"
"$PY" tools/compare_runs.py "${runs[@]}" --out "$DEMO_DIR/compare.png"
echo "demo wall time: $(( $(date +%s) - t_start )) s"
