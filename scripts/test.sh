#!/usr/bin/env bash
# Runs every test tier and ends with one summary line: "tests: N passed, N failed".
# Host suites run in parallel; the real-device suites (each boots a VM where the kernel lacks
# ublk, and the machine has two cores) run one after the other.
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE_SUITES=(test/vm.test.ts test/ublk-vm.test.ts test/cli-vm.test.ts)
reports=()
trap 'rm -f "${reports[@]}"' EXIT
status=0

run_vitest() {
  local report
  report=$(mktemp)
  reports+=("$report")
  npx vitest run --reporter=default --reporter=json --outputFile.json="$report" "$@" || status=1
}

if [ $# -gt 0 ]; then
  run_vitest "$@"
else
  excludes=()
  for s in "${DEVICE_SUITES[@]}"; do excludes+=(--exclude "$s"); done
  run_vitest "${excludes[@]}"
  present=()
  for s in "${DEVICE_SUITES[@]}"; do [ -f "$s" ] && present+=("$s"); done
  [ ${#present[@]} -gt 0 ] && run_vitest --no-file-parallelism "${present[@]}"
fi

node -e '
const fs = require("fs");
let passed = 0, failed = 0, skipped = 0;
for (const file of process.argv.slice(1)) {
  let r;
  try { r = JSON.parse(fs.readFileSync(file, "utf8")); } catch { failed++; continue; }
  passed += r.numPassedTests;
  failed += r.numFailedTests;
  // A suite that failed to load has no failed tests of its own: count it.
  if (!r.success && r.numFailedTests === 0) failed += Math.max(1, r.numFailedTestSuites || 0);
  skipped += (r.numPendingTests || 0) + (r.numTodoTests || 0);
}
console.log(`tests: ${passed} passed, ${failed} failed` + (skipped ? `, ${skipped} skipped` : ""));
' "${reports[@]}"
exit $status
