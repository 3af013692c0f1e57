#!/bin/bash
# The cldd walk-through, narrated: run as root where the kernel has ublk (npm run demo starts
# it in the test VM otherwise). Every step is a real command on real block devices.
set -euo pipefail
cd "$(dirname "$0")/../.."
# A function, not "node $PWD/..." in a variable: the checkout's path may hold spaces.
CLDD_JS=$PWD/bin/cldd.js
cldd() { node "$CLDD_JS" "$@"; }
WORK=$(mktemp -d /tmp/cldd-demo.XXXXXX)
export CLDD_START_TIMEOUT_MS=120000
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }
cleanup() {
  umount "$WORK/backup" 2>/dev/null || true
  umount "$WORK/home" 2>/dev/null || true
  cldd remove --force demo >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
mkdir -p "$WORK/home" "$WORK/backup"

say "Create a 256 MiB backing file and turn it into a cldd pair"
run cldd add "$WORK/disk.img" --size 256M --name demo

say "Use the master like any disk: make a filesystem, mount it, put files on it"
run mkfs.ext4 -q /dev/cldd/demo/master
run mount /dev/cldd/demo/master "$WORK/home"
for i in 1 2 3; do echo "report $i, written before the backup" > "$WORK/home/report-$i.txt"; done
run ls "$WORK/home"

say "A user keeps writing while we take the snapshot"
( i=0; while [ ! -e "$WORK/stop" ]; do echo "entry $i" >> "$WORK/home/journal.log"; i=$((i + 1)); done ) &
writer=$!
sleep 1
say "Enable the slave: the mounted filesystem is frozen only for the switch"
run cldd enable demo
sleep 1
echo "report 4, written after the snapshot" > "$WORK/home/report-4.txt"
echo "report 1, changed after the snapshot" > "$WORK/home/report-1.txt"

say "Mount the slave read-only: it shows the disk as it was at enable time"
run mount -o ro,noload /dev/cldd/demo/slave "$WORK/backup"
run ls "$WORK/backup"
run cat "$WORK/backup/report-1.txt"
lines_then=$(wc -l < "$WORK/backup/journal.log")
echo "the slave's journal.log has $lines_then lines, frozen at the snapshot"
run cldd status demo

say "Back it up from the slave while the master stays in use"
run tar -C "$WORK/backup" -czf "$WORK/backup.tgz" .
run tar -tzf "$WORK/backup.tgz"

say "Done with the backup: unmount the slave and disable it; the changes merge back in the background"
run umount "$WORK/backup"
touch "$WORK/stop"; wait "$writer"
run cldd disable demo --wait
lines_now=$(wc -l < "$WORK/home/journal.log")
echo "the master's journal.log has $lines_now lines: every write kept ($lines_then at the snapshot)"
run cat "$WORK/home/report-1.txt"

say "Check the filesystem, remove the pair, and verify the store offline"
run umount "$WORK/home"
run e2fsck -fn /dev/cldd/demo/master
run cldd remove demo
run cldd check "$WORK/disk.img"

say "Reattach it: the data is still there"
run cldd add "$WORK/disk.img" --name demo
run mount /dev/cldd/demo/master "$WORK/home"
run ls "$WORK/home"
say "That is cldd."
