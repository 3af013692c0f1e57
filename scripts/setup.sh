#!/usr/bin/env bash
# Idempotent setup: installs the system packages and npm dependencies cldd needs, then builds.
# Safe to run again and again; does nothing that is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages, installed with apt-get only when missing.
# Add to this list when the project starts to need a new one.
APT_PACKAGES=(${CLDD_APT_PACKAGES:-})
if [ -f scripts/apt-packages.txt ]; then
  while read -r pkg _; do
    case "$pkg" in ''|'#'*) continue ;; esac
    APT_PACKAGES+=("$pkg")
  done < scripts/apt-packages.txt
fi
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: these system packages are missing and installing them needs root: ${missing[*]}" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

# npm dependencies: install when absent or when the lock file changed since the last install.
# (npm install, not npm ci: some npm versions write lock files without other platforms' optional
# packages, which npm ci then refuses; npm install still installs the locked versions.)
if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  echo "setup: installing npm dependencies" >&2
  npm install --no-audit --no-fund >&2
fi

# Build the TypeScript (and, when present, the native addon).
npx tsc -p tsconfig.build.json >&2
if [ -f binding.gyp ]; then
  if [ ! -f build/Release/cldd_native.node ] || [ -n "$(find native binding.gyp -newer build/Release/cldd_native.node -print -quit)" ]; then
    echo "setup: building the native addon" >&2
    npx node-gyp rebuild >&2
  fi
fi
