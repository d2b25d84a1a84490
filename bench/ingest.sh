#!/usr/bin/env bash
# Ingestion benchmark (docs/PERFORMANCE.md): AMQP -> durable store with real rs-mini images,
# twice: the whole rs-mini mix (mean ~220 kB per image) and its RSICD JPEGs only (~11 kB).
# Needs RabbitMQ on 127.0.0.1:5672 (guest/guest). Uses a throw-away queue and store.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED="${RSITRD_SHARED_DIR:-../shared}"
WORK="${WORK:-/var/tmp/rsitrd-bench}"
mkdir -p "$WORK"
cargo build --release --quiet
BIN="${CARGO_TARGET_DIR:-target}/release/rsitrd"
python3 - "$SHARED/data/rs-mini/dataset.json" "$WORK/rsicd-only.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
d["images"] = [i for i in d["images"] if i["filename"].startswith("rsicd")]
json.dump(d, open(sys.argv[2], "w"))
PY
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(rabbitmqctl version 2>/dev/null | head -1 || echo 'RabbitMQ ?')"
for dataset in "$SHARED/data/rs-mini/dataset.json" "$WORK/rsicd-only.json"; do
  echo "== $(basename "$dataset")"
  RSITRD_LOG=warn RSITRD__STORE__DIR="$WORK" "$BIN" bench-ingest \
    --dataset "$dataset" --images "$SHARED/data/rs-mini/images" --messages "${MESSAGES:-3000}" \
    --latency-rate 200 --latency-messages 1000
done
