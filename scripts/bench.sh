#!/usr/bin/env bash
# npm run bench: engine figures (any machine) written to docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
npx vite-node scripts/bench/engine.ts
