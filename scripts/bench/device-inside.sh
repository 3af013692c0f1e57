#!/bin/bash
# Runs inside a VM with ublk (scripts/vm/run.sh) or on a host with ublk, as root: fio on the cldd
# master and on a kernel loop device over an identical backing file, one after the other in the
# same machine. Prints one JSON line per job and device: {"job", "device", "iops", "bw", "lat_us"}.
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${CLDD_BENCH_WORK:-/tmp/cldd-bench}
RUNTIME=${CLDD_BENCH_RUNTIME:-15}
SIZE=${CLDD_BENCH_SIZE:-1G}
mkdir -p "$WORK"
export CLDD_START_TIMEOUT_MS=120000
CLDD="node $PWD/bin/cldd.js"

rm -f "$WORK/cldd.img" "$WORK/loop.img"
$CLDD add "$WORK/cldd.img" --size "$SIZE" --name bench --queues "${CLDD_BENCH_QUEUES:-1}" --depth 64 >&2
master=$(readlink -f /dev/cldd/bench/master)
bytes=$(blockdev --getsize64 "$master")
# The loop device gets a backing file of the master's size on the same filesystem, and direct
# I/O like the cldd store's reads and writes go through the page cache: both are buffered.
truncate -s "$bytes" "$WORK/loop.img"
loop=$(losetup --find --show "$WORK/loop.img")
# Fill both once so reads hit allocated blocks on both.
for dev in "$master" "$loop"; do
  dd if=/dev/urandom of="$dev" bs=1M count=$((bytes / 1048576)) oflag=direct status=none
done
sync

run() { # name rw bs iodepth dev
  fio --name="$1" --filename="$5" --rw="$2" --bs="$3" --iodepth="$4" --ioengine=io_uring --direct=1 \
    --runtime="$RUNTIME" --time_based --ramp_time=2 --group_reporting --output-format=json 2>/dev/null |
    node -e '
      let s = ""; process.stdin.on("data", (d) => (s += d)).on("end", () => {
        const j = JSON.parse(s).jobs[0]; const io = j.read.io_bytes > 0 ? j.read : j.write;
        console.log(JSON.stringify({ job: process.argv[1], device: process.argv[2], iops: io.iops, bw: io.bw_bytes, lat_us: io.clat_ns.mean / 1000 }));
      });' "$1" "$6"
}

for job in "randread-4k-qd1 randread 4k 1" "randread-4k-qd32 randread 4k 32" "randwrite-4k-qd1 randwrite 4k 1" \
           "randwrite-4k-qd32 randwrite 4k 32" "read-1m-seq read 1M 8" "write-1m-seq write 1M 8"; do
  set -- $job
  run "$1" "$2" "$3" "$4" "$master" cldd
  run "$1" "$2" "$3" "$4" "$loop" loop
done
losetup -d "$loop"
$CLDD remove bench >&2
