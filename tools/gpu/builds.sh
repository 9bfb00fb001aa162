#!/usr/bin/env bash
# Builds `ptxgrad` as it is at other commits, for tools/gpu/check.sh to bench beside the current
# build in the same run on the same GPU: the ratio of their step rates is what the commits in
# between changed, measured minutes apart rather than against figures from another machine.
#
# usage, from the project root:   tools/gpu/builds.sh [REV ...]
# Default: a48db03, the build whose figures BENCHMARKS.md reports, so that the same figure again
# says the two runs are comparable. Writes .builds/bundle.tar.xz (git-ignored): one stripped
# binary per revision, with a line saying what it is.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
revs=("$@")
[ ${#revs[@]} -gt 0 ] || revs=(a48db03)
# The kernels compile with NVRTC from the project's wheels, as the current build's do.
eval "$(scripts/cuda-wheels.sh)"
export PTXGRAD_REQUIRE_KERNELS=1
# One target directory for every revision (dependencies built once), inside the ignored target/.
export CARGO_TARGET_DIR="$root/target/builds"
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
rm -rf .builds && mkdir -p .builds
# Most of each binary is the same library code: xz -9's large window keeps it once.
tar -C "$stage" -cf - . | xz -9 > .builds/bundle.tar.xz
echo "built ${#built[@]} revisions: .builds/bundle.tar.xz ($(du -k .builds/bundle.tar.xz | cut -f1) KiB)" >&2
