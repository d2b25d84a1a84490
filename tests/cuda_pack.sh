#!/usr/bin/env bash
# Prepares, on a machine without a GPU, what a lent GPU machine needs for tests/cuda_check.sh,
# in ./device-pack (ignored by git), so that the device session's minutes go to the check and
# not to a build:
#   - rsitrd built with --features cuda (cudarc loads the CUDA libraries at run time: no toolkit
#     is needed to build, and the binary still runs on a CPU-only machine), stripped and
#     xz-compressed, because the working tree that travels is limited to 64 MiB;
#   - the rs-mini samples (the ../shared beside a checkout does not travel).
# Then one call of the device tool (timeout_s leaves room to rerun within the session's time):
#   run(command="BIN=device-pack/rsitrd.xz RSITRD_SHARED_DIR=device-pack/shared
#        RESULTS=/tmp/cuda-check ARCHIVE=$OUT/cuda-check.tar.gz tests/cuda_check.sh",
#       carry=["device-pack"], timeout_s=420)
# and, from then on, the archive's autotune/ copied to device-pack/autotune with
# AUTOTUNE_CACHE=device-pack/autotune added to the command.
set -euo pipefail
cd "$(dirname "$0")/.."
PACK=device-pack
SHARED="${RSITRD_SHARED_DIR:-../shared}"
CUDARC_CUDA_VERSION="${CUDARC_CUDA_VERSION:-12080}" cargo build --release --features cuda
mkdir -p "$PACK/shared/data"
strip -o "$PACK/rsitrd" target/release/rsitrd
xz -T0 -6 -f "$PACK/rsitrd"
rm -rf "$PACK/shared/data/rs-mini"
cp -r "$SHARED/data/rs-mini" "$PACK/shared/data/"
# The whole tree that travels: tracked files, untracked files git does not ignore, the pack.
# One du over the whole list (xargs could split it and print several totals); a tracked file
# deleted in the work tree does not travel, so du's complaint about it is dropped.
tree=$(git ls-files -z --cached --others --exclude-standard |
  { du -cb --files0-from=- 2>/dev/null || true; } | tail -n 1 | cut -f1)
pack=$(du -sb "$PACK" | cut -f1)
echo "device-pack: $((pack / 1024 / 1024)) MiB; with the working tree: $(((tree + pack) / 1024 / 1024)) MiB of 64"
if [ $((tree + pack)) -ge $((64 * 1024 * 1024)) ]; then
  echo "error: over the 64 MiB that a device call carries" >&2
  exit 1
fi
