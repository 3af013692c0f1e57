#!/usr/bin/env bash
# npm run demo: the cldd walk-through on real block devices, narrated. Natively where the kernel
# has ublk (as root), else inside the test VM (scripts/vm/run.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -e /dev/ublk-control ] && [ "$(id -u)" = 0 ]; then
  exec bash scripts/demo/walkthrough.sh
fi
echo "demo: this kernel has no ublk driver; running the walk-through in a VM with Debian's 6.12 kernel" >&2
exec bash scripts/vm/run.sh -- bash scripts/demo/walkthrough.sh
