#!/bin/bash
# Runs inside a VM with ublk (scripts/vm/run.sh) or on a host with ublk, as root: fio on the cldd
# master and on a kernel loop device over an identical backing file, one after the other in the
# same machine, in CLDD_BENCH_ROUNDS rounds. Prints one JSON line per round, job and device:
# {"round", "job", "device", "iops", "bw", "lat_us"}.
# There is one pair per mode in CLDD_BENCH_MODES ("zero-copy", the default, and
# "no-zero-copy"), reported as devices "cldd" and "cldd-copy"; {"zeroCopy":true} is printed when
# the kernel gave the first one zero copy.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNTIME=${CLDD_BENCH_RUNTIME:-10}
# The same job on the same device varies by up to 2x between runs in the TCG VM (loop's 4 KiB
# writes at QD32 ranged from 7k to 21k IOPS in one session): each job runs on every device in
# turn, in several rounds, and the report takes the median of each round's ratio.
ROUNDS=${CLDD_BENCH_ROUNDS:-3}
SIZE=${CLDD_BENCH_SIZE:-1G}
# All backing files live on one file system. In the VM that is ext4 on a RAM disk (brd, loaded
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

MODES=${CLDD_BENCH_MODES:-zero-copy}
rm -f "$WORK"/cldd*.img "$WORK/loop.img"
# One pair per mode, all on the same file system, all filled, each job run on every device in turn.
devices=()
for mode in $MODES; do
  name=bench-$mode
  rm -f "/run/cldd/$name.log"
  $CLDD add "$WORK/$name.img" --size "$SIZE" --name "$name" --queues "${CLDD_BENCH_QUEUES:-1}" --depth 64 "--$mode" >&2
  dev=$(readlink -f "/dev/cldd/$name/master")
  if [ "$mode" = zero-copy ]; then
    devices+=("cldd=$dev")
    grep -q "zero copy" "/run/cldd/$name.log" && echo '{"zeroCopy":true}'
  else
    devices+=("cldd-copy=$dev")
  fi
done
master=${devices[0]#*=}
bytes=$(blockdev --getsize64 "$master")
# The loop device gets a backing file of the master's size on the same file system and no direct
# I/O: like the cldd store's, its reads and writes go through the page cache.
truncate -s "$bytes" "$WORK/loop.img"
loop=$(losetup --find --show "$WORK/loop.img")
devices+=("loop=$loop")
# Fill them once so reads hit allocated blocks everywhere.
for d in "${devices[@]}"; do
  dd if=/dev/urandom of="${d#*=}" bs=1M count=$((bytes / 1048576)) oflag=direct status=none
done
sync

run() { # name rw bs iodepth dev device-label round
  fio --name="$1" --filename="$5" --rw="$2" --bs="$3" --iodepth="$4" --ioengine=io_uring --direct=1 \
    --runtime="$RUNTIME" --time_based --ramp_time=2 --group_reporting --output-format=json 2>/dev/null |
    node -e '
      let s = ""; process.stdin.on("data", (d) => (s += d)).on("end", () => {
        const j = JSON.parse(s).jobs[0]; const io = j.read.io_bytes > 0 ? j.read : j.write;
        console.log(JSON.stringify({ round: Number(process.argv[3]), job: process.argv[1], device: process.argv[2], iops: io.iops, bw: io.bw_bytes, lat_us: io.clat_ns.mean / 1000 }));
      });' "$1" "$6" "$7"
}

for round in $(seq "$ROUNDS"); do
  for job in "randread-4k-qd1 randread 4k 1" "randread-4k-qd32 randread 4k 32" "randwrite-4k-qd1 randwrite 4k 1" \
             "randwrite-4k-qd32 randwrite 4k 32" "read-1m-seq read 1M 8" "write-1m-seq write 1M 8"; do
    set -- $job
    # Each round starts with another device, so none always follows the same job's writeback.
    for ((i = 0; i < ${#devices[@]}; i++)); do
      d=${devices[(i + round - 1) % ${#devices[@]}]}
      run "$1" "$2" "$3" "$4" "${d#*=}" "${d%%=*}" "$round"
    done
  done
done
losetup -d "$loop"
for mode in $MODES; do $CLDD remove "bench-$mode" >&2; done
