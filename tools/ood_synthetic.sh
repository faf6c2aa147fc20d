#!/usr/bin/env bash
# OOD detection on the synthetic data, every model at the same training budget: PALM (6 prototypes per
# class; EMA momentum 0.99, as the 1280 steps are too few for the official 0.999), the single-prototype
# baseline (--cache-size 1) and cross-entropy (the MSP baseline), then `ood eval` of each with Mahalanobis,
# KNN and MSP, plus the demo's CLIP and ProtoCLIP checkpoints when tools/demo.sh has written them. Prints
# one table; every row also lands in <run>/eval/results.jsonl.
#   bash tools/ood_synthetic.sh          (about 3 hours at one thread on a 2-core AMD EPYC; runs already done are kept)
# Environment knobs: VENV (default .venv), OOD_DIR (default ood_synthetic), DEMO_DIR (default demo),
# OOD_EPOCHS (default 40), OOD_THREADS (default 1).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${VENV:-.venv}/bin/python
DIR=${OOD_DIR:-ood_synthetic}
DEMO_DIR=${DEMO_DIR:-demo}
EPOCHS=${OOD_EPOCHS:-40}
export OMP_NUM_THREADS=${OOD_THREADS:-1}
D=$DIR/data
L=$DIR/logs

# (a) data: 4000 training images of the 20 classes, 1000 validation (ID), 1000 of 12 unseen classes (OOD),
# and the validation images in grayscale as a second OOD set (the classes are colour x shape)
if [ ! -f "$D/info.json" ]; then
  "$PY" -m pyprotoclip data synthetic --out "$D" --num-samples 4000 --num-val 1000 --num-ood 1000 --seed 0
fi
if [ ! -f "$D/val_gray/sizes.json" ]; then
  "$PY" - "$D/val/00000.tar" "$D/gray_src/gray" <<'EOF'
import io, os, sys, tarfile
from PIL import Image
out = sys.argv[2]
os.makedirs(out, exist_ok=True)
with tarfile.open(sys.argv[1]) as tar:
    for m in tar.getmembers():
        if m.name.endswith((".png", ".jpg")):
            img = Image.open(io.BytesIO(tar.extractfile(m).read())).convert("L").convert("RGB")
            img.save(os.path.join(out, os.path.basename(m.name).rsplit(".", 1)[0] + ".png"))
EOF
  "$PY" -m pyprotoclip data from-folder --root "$D/gray_src" --out "$D/val_gray"
fi
TRAIN="$D/train/{00000..00003}.tar"

# (b) training: 4000 images x EPOCHS epochs, batch 128, two crop+flip views (colour jitter would erase the
# classes), SGD lr 0.1 with 2 warm-up epochs then cosine
COMMON=(--train-data "$TRAIN" --backbone tiny-rn --batch-size 128 --epochs "$EPOCHS" --lr 0.1 --warmup-epochs 2
        --augment crop --crop-scale 0.5 --workers 1 --logs "$L" --log-every-n-steps 32 --save-frequency 0 --device cpu)
declare -A FLAGS=(
  [palm_m0.99]="--proto_m 0.99"
  [cache1_m0.99]="--cache-size 1 --proto_m 0.99"
  [ce]="--loss ce"
)
RUNS=(palm_m0.99 cache1_m0.99 ce)
for name in "${RUNS[@]}"; do
  if [ -f "$L/$name/done" ]; then echo "== [ood] $name already trained"; continue; fi
  resume=""; [ -f "$L/$name/checkpoints/epoch_latest.pt" ] && resume="--resume latest"
  echo "== [ood] training $name"
  # shellcheck disable=SC2086
  "$PY" -m pyprotoclip ood train "${COMMON[@]}" --name "$name" ${FLAGS[$name]} $resume
  touch "$L/$name/done"
done

# (c) scores
EVAL=(--train-data "$TRAIN" --id-data "$D/val/00000.tar" --ood-data "$D/ood/00000.tar" --ood-name unseen-shapes
      --ood-data "$D/val_gray/00000.tar" --ood-name grayscale-val --workers 1 --device cpu --score mahalanobis
      --score knn --score msp)
outs=()
for name in "${RUNS[@]}"; do
  "$PY" -m pyprotoclip ood eval --checkpoint "$L/$name/checkpoints/epoch_latest.pt" "${EVAL[@]}" --out "$L/$name/eval"
  outs+=("$name=$L/$name/eval/results.jsonl")
done
for method in clip protoclip; do
  ck="$DEMO_DIR/logs/demo-$method/checkpoints/epoch_5.pt"
  [ -f "$ck" ] || { echo "== [ood] $ck not found (run tools/demo.sh first): skipping the $method row"; continue; }
  "$PY" -m pyprotoclip ood eval --checkpoint "$ck" "${EVAL[@]}" --score mcm --out "$L/demo-$method-eval"
  outs+=("demo-$method=$L/demo-$method-eval/results.jsonl")
done

# (d) ID accuracy of each ood-trained network: a logistic regression on its penultimate features, training
# split -> validation split
for name in "${RUNS[@]}"; do
  "$PY" - "$L/$name/checkpoints/epoch_latest.pt" "$TRAIN" "$D/val/00000.tar" > "$L/$name/eval/id_accuracy.txt" <<'EOF'
import sys
import numpy as np
from pyprotoclip.ood import score
from pyprotoclip.ood.scores import LinearHeadMSP, l2_normalise
model = score.load_scoring_model(sys.argv[1])
train, val = (score.extract(model, spec, batch_size=256, workers=1) for spec in sys.argv[2:4])
probe = LinearHeadMSP(train["features"], train["labels"])
f = (l2_normalise(val["features"].numpy().astype(np.float64)) - probe.mean) / probe.std
print(f"{100 * (probe.clf.predict(f) == val['labels'].numpy()).mean():.1f}")
EOF
done

# (e) one table: FPR95 / AUROC (%) per score and OOD set
"$PY" - "${outs[@]}" <<'EOF'
import json, os, sys
print(f"{'model':14s} {'ID acc':>6s}  {'score':12s} {'unseen-shapes':>16s} {'grayscale-val':>16s}   (FPR95 / AUROC, %)")
for arg in sys.argv[1:]:
    name, path = arg.split("=", 1)
    acc_file = os.path.join(os.path.dirname(path), "id_accuracy.txt")
    acc = open(acc_file).read().strip() if os.path.exists(acc_file) else ""
    rows = {}
    for line in open(path):
        r = json.loads(line)
        if r.get("type") == "ood_eval":
            rows[(r["score"], r["ood"])] = f"{100 * r['fpr95']:5.1f} / {100 * r['auroc']:5.1f}"
    for i, score in enumerate(dict.fromkeys(s for s, _ in rows)):
        print(f"{name if i == 0 else '':14s} {acc if i == 0 else '':>6s}  {score:12s} "
              f"{rows.get((score, 'unseen-shapes'), '-'):>16s} {rows.get((score, 'grayscale-val'), '-'):>16s}")
EOF
