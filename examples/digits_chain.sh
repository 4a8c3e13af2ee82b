#!/usr/bin/env bash
# The whole VBSW chain (the paper's Algorithm 3) on the sample digits:
#   1. embed the train and test images with the sample backbone (M*),
#   2. weigh the training features (k = 20, m = 40),
#   3. retrain the head with and without the weights over several seeds,
#   4. evaluate every head on the test features and compare the two runs,
#   5. merge one VBSW head onto the backbone and evaluate the single model on
#      the raw test images.
# Usage: examples/digits_chain.sh [OUTPUT_FOLDER] [SEEDS]
set -euo pipefail

out=${1:-chain_out}
seeds=${2:-5}
# The sample data beside this script, from wherever it is run.
data=$(cd "$(dirname "$0")/../sample_data" && pwd)
backbone=$data/digits_backbone.onnx
mkdir -p "$out"

vbsw embed "$backbone" "$data/digits_train.parquet" -o "$out/train.parquet" -q
vbsw embed "$backbone" "$data/digits_test.parquet" -o "$out/test.parquet" -q
vbsw weigh "$out/train.parquet" --k 20 --m 40 -o "$out/train_weighted.parquet"

for seed in $(seq 0 $((seeds - 1))); do
  for run in baseline vbsw; do
    weights=$([ "$run" = baseline ] && echo --no-weights || true)
    vbsw retrain-head "$out/train_weighted.parquet" $weights --seed "$seed" \
      -o "$out/$run-$seed.onnx" -q
    vbsw evaluate "$out/$run-$seed.onnx" "$out/test.parquet" --run-name "$run" \
      --seed "$seed" --json "$out/$run-$seed.json" -q
  done
done

echo "== the original backbone, and the heads on its test features" >&2
vbsw evaluate "$backbone" "$data/digits_test.parquet" --run-name backbone \
  --json "$out/backbone.json"
vbsw evaluate --compare "$out"/baseline-*.json "$out"/vbsw-*.json \
  --json "$out/comparison.json"

echo "== one deployable model: the backbone with the VBSW head of seed 0" >&2
vbsw retrain-head "$out/train_weighted.parquet" --seed 0 -o "$out/head.onnx" \
  --backbone "$backbone" --merged-output "$out/digits_vbsw.onnx" -q
vbsw evaluate "$out/digits_vbsw.onnx" "$data/digits_test.parquet"
