#!/usr/bin/env bash
# npm run bench: engine figures (any machine) and device figures (where the kernel has ublk:
# natively, or in the test VM), written to docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
npx vite-node scripts/bench/engine.ts
npx vite-node scripts/bench/device.ts
