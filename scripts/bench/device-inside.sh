#!/bin/bash
# Runs inside a VM with ublk (scripts/vm/run.sh) or on a host with ublk, as root: fio on the cldd
# master and on a kernel loop device over an identical backing file, one after the other in the
# same machine. Prints one JSON line per job and device: {"job", "device", "iops", "bw", "lat_us"}.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNTIME=${CLDD_BENCH_RUNTIME:-15}
SIZE=${CLDD_BENCH_SIZE:-1G}
# Both backing files live on one file system. In the VM that is ext4 on a RAM disk (brd, loaded
# by scripts/bench/device.ts): a real file system, unlike tmpfs, where io_uring hands every
# buffered read and write to a worker thread (shmem has no non-blocking I/O on 6.12).
if [ -z "${CLDD_BENCH_WORK:-}" ] && [ -b /dev/ram0 ] && [ "$(blockdev --getsize64 /dev/ram0)" -ge $((1536 << 20)) ]; then
  mkfs.ext4 -q -F /dev/ram0
  mkdir -p /mnt/cldd-bench
  mount /dev/ram0 /mnt/cldd-bench
  WORK=/mnt/cldd-bench
  echo '{"fs":"ext4 on a RAM disk (brd)"}'
else
  WORK=${CLDD_BENCH_WORK:-/tmp/cldd-bench}
  mkdir -p "$WORK"
  echo "{\"fs\":\"$(stat -f -c %T "$WORK")\"}"
fi
export CLDD_START_TIMEOUT_MS=120000
CLDD="node $PWD/bin/cldd.js"

rm -f "$WORK/cldd.img" "$WORK/loop.img"
$CLDD add "$WORK/cldd.img" --size "$SIZE" --name bench --queues "${CLDD_BENCH_QUEUES:-1}" --depth 64 >&2
master=$(readlink -f /dev/cldd/bench/master)
bytes=$(blockdev --getsize64 "$master")
# The loop device gets a backing file of the master's size on the same file system and no direct
# I/O: like the cldd store's, its reads and writes go through the page cache.
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
