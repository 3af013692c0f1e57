#!/usr/bin/env bash
# npm run demo: the cldd walk-through, narrated.
set -euo pipefail
cd "$(dirname "$0")/.."
npx vite-node scripts/demo/engine-walkthrough.ts
