#!/usr/bin/env bash
# Interleaved rounds of the ViT-B/32 CPU benchmark: each round runs every given rsitrd binary
# and then PyTorch (tests/bench_torch.py) back to back, so that a noisy shared machine moves
# them together; prints each round's figures and the medians of the ratios to PyTorch.
#   PYTHON=/path/to/venv/bin/python bench/rounds.sh ROUNDS BINARY...
# AVX2=1 limits PyTorch to AVX2 (for binaries built with `--no-default-features`, i.e. without
# the x86-v4 feature that brings gemm's AVX-512 kernels: the AVX2 stand-in of
# docs/PERFORMANCE.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
ROUNDS="$1"
shift
ARGS=(--batch-size "${BATCH:-16}" --iterations "${ITERS:-3}" --only image,text,train,linear
  --captions "${CAPTIONS:-../shared/data/rs-mini/dataset.json}")
TORCH_ENV=()
if [ "${AVX2:-0}" = 1 ]; then
  TORCH_ENV=(ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2)
fi
lines=()
for round in $(seq 1 "$ROUNDS"); do
  for binary in "$@"; do
    lines+=("$round $binary $("$binary" bench --preset vit-b-32 "${ARGS[@]}" 2>/dev/null | tail -1)")
  done
  lines+=("$round torch $(env "${TORCH_ENV[@]}" "$PYTHON" tests/bench_torch.py "${ARGS[@]}" 2>/dev/null | tail -1)")
done
printf '%s\n' "${lines[@]}" | "$PYTHON" -c '
import json, statistics, sys
rounds = {}
for line in sys.stdin:
    round_, name, report = line.split(" ", 2)
    rounds.setdefault(round_, {})[name] = json.loads(report)
keys = ["train_pairs_per_s", "image_embed_per_s", "text_embed_per_s", "linear_gflops", "peak_rss_mib"]
ratios = {}
for round_, runs in rounds.items():
    torch = runs.pop("torch")
    for name, run in runs.items():
        cells = []
        for key in keys:
            ratio = run[key] / torch[key]
            ratios.setdefault((name, key), []).append(ratio)
            cells.append(f"{key} {run[key]:.2f} / {torch[key]:.2f} ({ratio:.2f}x)")
        print(f"round {round_} {name}: " + ", ".join(cells))
for (name, key), values in ratios.items():
    print(f"median {name} {key}: {statistics.median(values):.2f}x PyTorch (range {min(values):.2f}-{max(values):.2f})")
'
