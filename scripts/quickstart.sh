#!/usr/bin/env bash
# README command (a): the whole job on the embedded synthetic GlaS, end to end on a CPU:
# build the dataset -> train a U-Net briefly -> export a SavedModel -> evaluate it -> predict.
# Usage: bash scripts/quickstart.sh [WORK_DIR]   (default runs/quickstart)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${1:-runs/quickstart}"
TFDS_DIR="$WORK/tfds"

tfds build glas/synthetic --imports tfds_glas --data_dir "$TFDS_DIR"
python -m keras_glas.train unet --config configs/unet_quickstart.yaml \
  --data-dir "$TFDS_DIR" --run-dir "$WORK/unet"
python -m keras_glas.export "$WORK/unet" "$WORK/unet_savedmodel" --overwrite
python -m keras_glas.evaluate "$WORK/unet_savedmodel" --split all --dataset glas/synthetic \
  --data-dir "$TFDS_DIR" --json "$WORK/metrics.json" --figures "$WORK/figures"
python -c "from tfds_glas.glas.synthetic import write_tiles; write_tiles('$WORK/images', 3)"
python -m keras_glas.predict "$WORK/unet_savedmodel" "$WORK"/images/*.png --out "$WORK/predictions"
echo "Done: metrics in $WORK/metrics.json, figures in $WORK/figures, predictions in $WORK/predictions"
