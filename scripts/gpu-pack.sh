#!/usr/bin/env bash
# Packs all that one GPU run of scripts/gpu-check.sh needs, here (no GPU needed):
#   ../shared/gpu/pack --data --peer     every binary, test and bench, the data and the peer -> .gpu/
#   scripts/milestones.sh                the earlier builds -> .milestones/  (skip: --no-milestones)
# then checks that what travels fits the device tool's 64 MiB and says what to carry.
#
# Use this rather than the bare pack: every binary embeds the kernels (1.7 MB of compressed PTX
# and 1.7 MB of sm_90 machine code, see build.rs), and the copies in the ~28 binaries are one
# binary apart in the archive, farther than the 8 MiB window of xz's default level: packed so,
# the bundle is ~56 MB and does not travel with the 30 MB working tree. xz -9's 64 MiB window
# finds them (~11 MB); one thread, as more would cut the stream into blocks that lose them.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
eval "$(scripts/cuda-wheels.sh)"
XZ_OPT="-9 -T1" ../shared/gpu/pack --data --peer
carry='".gpu"'
if [ "${1:-}" != "--no-milestones" ]; then
  scripts/milestones.sh
  carry='".gpu", ".milestones"'
fi
tree_kb=$(git ls-files -co --exclude-standard -z | du -ck --files0-from=- 2>/dev/null | tail -1 | cut -f1)
packed_kb=$(du -sk .gpu $( [ -d .milestones ] && echo .milestones) | awk '{s += $1} END {print s}')
echo "working tree ${tree_kb} KiB + packed ${packed_kb} KiB = $((tree_kb + packed_kb)) KiB (at most 65536 travel)"
[ $((tree_kb + packed_kb)) -lt 65536 ] || { echo "too large to travel" >&2; exit 1; }
echo "device run: carry [$carry], command: bash scripts/gpu-check.sh"
