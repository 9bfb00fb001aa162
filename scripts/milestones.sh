#!/usr/bin/env bash
# Builds `ptxgrad` as it was at earlier commits, for scripts/gpu-check.sh to bench beside the
# current build in the same device run: the ratio between them is what the work in between did to
# the step rate, measured on one GPU within minutes (not against figures from another machine).
#
# usage, from the project root:   scripts/milestones.sh [REV ...]
# Writes .milestones/bundle.tar.xz (git-ignored; 2.6 MB for the four below): one stripped binary per
# revision, with a line saying what it is. Carry it with the pack: carry [".gpu", ".milestones"].
# About a minute here for the four (one shared target directory).
#
# The default revisions, oldest first:
#   a48db03  the build measured on the H200 on 2026-11-27 (3,522.6 examples/s, 0.32x PyTorch
#            fp32-strict): the same figure again says the two runs are comparable
#   83bab5f  the 3-stage cp.async pipeline (timed by the conv tests, never as a whole step)
#   c91d6e5  Winograd, --conv-algo auto, 16-byte loads, warp tiling, division-free index math,
#            the buffer cache
#   77d489f  shared-memory return path and copy addressing, 96-wide tiles, the tensor-core
#            arithmetic (--math 3xtf32, tf32)
# The current build is the one gpu-check.sh benches first.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
revs=("$@")
[ ${#revs[@]} -gt 0 ] || revs=(a48db03 83bab5f c91d6e5 77d489f)
# The kernels compile with NVRTC from the project's wheels, as the current build's do.
eval "$(scripts/cuda-wheels.sh)"
export PTXGRAD_REQUIRE_KERNELS=1
# One target directory for every revision (dependencies built once), inside the ignored target/.
export CARGO_TARGET_DIR="$root/target/milestones"
stage=$(mktemp -d); work=$(mktemp -d); built=()
trap 'rm -rf "$stage" "$work"; git worktree prune' EXIT
for rev in "${revs[@]}"; do
  short=$(git rev-parse --short=7 "$rev^{commit}")
  echo "== $short: $(git log -1 --format='%ad %s' --date=short "$short" | cut -c1-100)" >&2
  git worktree add --detach --force "$work/$short" "$short" > /dev/null 2>&1
  (cd "$work/$short" && cargo build --release --bin ptxgrad 2>&1 | grep -E "^(warning: ptxgrad|error)" >&2 || true)
  [ -x "$CARGO_TARGET_DIR/release/ptxgrad" ] || { echo "$short: no binary built" >&2; exit 1; }
  mkdir -p "$stage/$short"
  cp "$CARGO_TARGET_DIR/release/ptxgrad" "$stage/$short/bin-ptxgrad"
  strip --strip-debug "$stage/$short/bin-ptxgrad" 2>/dev/null || true
  git log -1 --format='%h %ad %s' --date=short "$short" | cut -c1-160 > "$stage/$short/about"
  rm -f "$CARGO_TARGET_DIR/release/ptxgrad"  # the next revision must build its own
  git worktree remove --force "$work/$short"
  built+=("$short")
done
printf '%s\n' "${built[@]}" > "$stage/order"
rm -rf .milestones && mkdir -p .milestones
# Most of each binary is the same library code: xz -9's large window keeps it once.
tar -C "$stage" -cf - . | xz -9 > .milestones/bundle.tar.xz
echo "built ${#built[@]} revisions: .milestones/bundle.tar.xz ($(du -k .milestones/bundle.tar.xz | cut -f1) KiB)" >&2
