#!/usr/bin/env bash
# The main job until `mtrec demo` exists: synthetic e-commerce data -> 2-worker training on an
# embedded local Ray (127.0.0.1) with the packaged MiniLM -> bundle, metrics.json, curves.png.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/demo}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mtrec data synth --scenario ecommerce --out "$OUT/data" --users 2000 --items 1000 --interactions 100000
mtrec train --data "$OUT/data" --out "$OUT/run" --preset synthetic-ecommerce
echo "bundle: $OUT/run/bundle   metrics: $OUT/run/metrics.json   curves: $OUT/run/curves.png"
