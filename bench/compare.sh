#!/usr/bin/env bash
# Side-by-side CPU benchmark at ViT-B/32 size (random weights): rsitrd (burn-flex) and the
# same work in PyTorch (tests/bench_torch.py), in one run on the same machine.
#   PYTHON=/path/to/venv/bin/python bench/compare.sh
# Needs torch, transformers and open_clip_torch in $PYTHON (see tests/make_fixtures.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
BATCH="${BATCH:-16}"
ITERS="${ITERS:-3}"
CAPTIONS="${CAPTIONS:-../shared/data/rs-mini/dataset.json}"
FEATURES="${FEATURES:-}"
# shellcheck disable=SC2086
cargo build --release $FEATURES >&2
rust=$(./target/release/rsitrd bench --preset vit-b-32 --batch-size "$BATCH" --iterations "$ITERS" --captions "$CAPTIONS")
torch=$("$PYTHON" tests/bench_torch.py --batch-size "$BATCH" --iterations "$ITERS" --captions "$CAPTIONS")
"$PYTHON" - "$rust" "$torch" "$FEATURES" <<'PY'
import json, sys
rust, torch, features = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3] or "default features"
print(f"rsitrd ({features}) vs {torch['framework']} ({torch['threads']} threads), batch {rust['batch_size']}, {rust['iterations']} timed iterations after 1 warm-up")
print()
print("| measure | rsitrd | PyTorch | rsitrd / PyTorch |")
print("|---|---|---|---|")
for key, label in [("image_embed_per_s", "image embedding (images/s)"), ("text_embed_per_s", "text embedding (captions/s)"),
                   ("train_pairs_per_s", "adapter training (pairs/s)"), ("matmul_gflops", "matmul alone, MLP shape (GFLOP/s)"),
                   ("peak_rss_mib", "peak RSS (MiB)")]:
    r, t = rust[key], torch[key]
    print(f"| {label} | {r:.2f} | {t:.2f} | {r / t:.2f} |")
print()
print("raw:", json.dumps(rust))
print("raw:", json.dumps(torch))
PY
