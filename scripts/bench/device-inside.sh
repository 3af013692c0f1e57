#!/bin/bash
# Runs inside a VM with ublk (scripts/vm/run.sh) or on a host with ublk, as root: fio on the cldd
# master and on a kernel loop device over an identical backing file, one after the other in the
# same machine, in CLDD_BENCH_ROUNDS rounds, and fsync through ext4 made on each of them.
# Prints one JSON line per round, job and device: {"round", "job", "device", "iops", "bw", "lat_us"}.
# Each round then measures first touch after enable on the first cldd pair and on dm-snapshot,
# into a change area never written and into one written all over, and the loop device into a
# fresh sparse file (lines with "phase": "before" or "after"), the first pair's resync against
# dd ({"resync"}), and after the last round each daemon's memory ({"rss"}).
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
if [ -z "${CLDD_BENCH_WORK:-}" ] && [ -b /dev/ram0 ] && [ "$(blockdev --getsize64 /dev/ram0)" -ge $((3 << 30)) ]; then
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
# A function, not "node $PWD/..." in a variable: the checkout's path may hold spaces.
CLDD_JS=$PWD/bin/cldd.js
cldd() { node "$CLDD_JS" "$@"; }

MODES=${CLDD_BENCH_MODES:-zero-copy}
# The program that copies the resync's runs without cldd, built by device.ts (an absolute path).
COPY_RUNS=${CLDD_BENCH_COPY_RUNS:?the path of copy-runs, built from scripts/bench/copy-runs.c by device.ts}
# CLDD_BENCH_JOBS: an extended regular expression; only the jobs whose names match it run (all by
# default). For a quick look at a few rows while working on them: `npm run bench` runs them all.
JOBS=${CLDD_BENCH_JOBS:-.}
wanted() { [[ $1 =~ $JOBS ]]; }
rm -f "$WORK"/cldd*.img "$WORK/loop.img"
# One pair per mode, all on the same file system, all filled, each job run on every device in turn.
devices=()
for mode in $MODES; do
  name=bench-$mode
  rm -f "/run/cldd/$name.log"
  # The defaults (queues, depth) but for the mode: the daemon's memory is measured too.
  cldd add "$WORK/$name.img" --size "$SIZE" --name "$name" "--$mode" >&2
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
# The reference C server beside them when CLDD_BENCH_UBLKSRV names its binary (ublksrv's `ublk`,
# built outside the project: DEVELOPERS.md), with its loop target over a file of the same size,
# buffered, with cldd's default queue count and depth.
UBLKSRV=${CLDD_BENCH_UBLKSRV:-}
if [ -n "$UBLKSRV" ]; then
  truncate -s "$bytes" "$WORK/ublksrv.img"
  "$UBLKSRV" add -t loop -n 9 -q 1 -d 128 -f "$WORK/ublksrv.img" --buffered_io >&2
  for _ in $(seq 100); do [ -b /dev/ublkb9 ] && break; sleep 0.1; done
  [ -b /dev/ublkb9 ] || { echo "bench: $UBLKSRV did not create /dev/ublkb9" >&2; exit 1; }
  devices+=("ublksrv=/dev/ublkb9")
fi
# Fill them once so reads hit allocated blocks everywhere.
for d in "${devices[@]}"; do
  dd if=/dev/urandom of="${d#*=}" bs=1M count=$((bytes / 1048576)) oflag=direct status=none
done
sync

run() { # name rw bs iodepth dev device-label round [fio options...]; $PHASE tags first-touch jobs
  # A job right after a snapshot makes half a pass at most (no --time_based, half the device's
  # bytes): fio's random map then writes each block once, so none is written twice in one
  # snapshot, and the resync after the QD32 one copies scattered runs however fast the host is
  # (a whole pass, 511 MiB in 6 s at 21k IOPS, left it one run to copy). The job before it runs
  # for the whole runtime like any other: one pass of a 511 MiB master took 2.6 s on a fast
  # host, 2 s of it fio's ramp, which left well under a second measured (ratios above 1 on 7.3).
  # Nor has that half pass a ramp: every first touch counts. fio keeps no latency during its ramp
  # and resets its figures at the ramp's end, so a half pass of 2.4 s was measured by its last
  # 0.4 s alone, and one done within the ramp (the QD32 written-area job at 40k IOPS, 1.6 s) had
  # its IOPS over the whole pass and a latency of 0 (99bba65's tables, 6.12).
  local loop_on=--time_based limit=() ramp=2
  [ "${PHASE:-}" = after ] && loop_on="" limit=(--io_size=$((bytes / 2))) ramp=0
  fio --name="$1" --filename="$5" --rw="$2" --bs="$3" --iodepth="$4" --ioengine=io_uring --direct=1 \
    --runtime="$RUNTIME" $loop_on "${limit[@]}" --ramp_time=$ramp --group_reporting --output-format=json "${@:8}" 2>/dev/null |
    node -e '
      let s = ""; process.stdin.on("data", (d) => (s += d)).on("end", () => {
        const j = JSON.parse(s).jobs[0]; const io = j.read.io_bytes > 0 ? j.read : j.write;
        const phase = process.argv[4] ? { phase: process.argv[4] } : {};
        // With --fsync=1 the latency is a write and its fsync together, the time a caller waits.
        const sync = j.sync && j.sync.total_ios > 0 ? j.sync.lat_ns.mean : 0;
        console.log(JSON.stringify({ round: Number(process.argv[3]), job: process.argv[1], device: process.argv[2], ...phase, iops: io.iops, bw: io.bw_bytes, lat_us: (io.clat_ns.mean + sync) / 1000 }));
      });' "$1" "$6" "$7" "${PHASE:-}"
}

# First touch: the same two write jobs before and right after a snapshot is taken, so that every
# write after it lands on a block not yet redirected (one pass of fio's random map at most, see
# run). Each "after" gets a snapshot of its own. Two conditions of the change area, as a store
# meets them: never written (a file store's first snapshot: the file system allocates each block
# a first touch lands on, as for dm-snapshot's fresh exception store beside it), and written all
# over by earlier snapshots (every snapshot after the first: cldd never gives the space back).
FIRST_TOUCH=("first-touch-randwrite-4k-qd32 randwrite 4k 32" "first-touch-randwrite-4k-qd1-fsync randwrite 4k 1 --fsync=1")
# The written condition's jobs are the same under another name.
written() { echo "${1/first-touch-/first-touch-written-area-}"; }
first_touch_cldd() { # round
  local name=bench-${MODES%% *} job
  for job in "${FIRST_TOUCH[@]}"; do
    set -- $job
    wanted "$1" || wanted "$(written "$1")" || continue
    PHASE=before run "$1" "$2" "$3" "$4" "$master" cldd "$round" "${@:5}"
  done
  # Never written: before each job the change area's blocks go back to the file system (the
  # pair is plain, so nothing reads them), as in a store that never had a snapshot. Its offset
  # is the superblock's field at byte 88 (docs/format.md); its length the master's.
  local store=$WORK/$name.img
  local change_offset
  change_offset=$(od -An -t u8 -j 88 -N 8 "$store" | tr -d ' ')
  for job in "${FIRST_TOUCH[@]}"; do
    set -- $job
    wanted "$1" || continue
    fallocate --punch-hole --offset "$change_offset" --length "$bytes" "$store"
    cldd enable "$name" --no-freeze >&2
    PHASE=after run "$1" "$2" "$3" "$4" "$master" cldd "$round" "${@:5}"
    # The first resync (the QD32 job's blocks) is timed against dd copying as many bytes.
    if [ "$4" = 32 ]; then
      # The job's own writes are written back first, as dd's source is below: the disable's
      # commit would otherwise spend its fdatasync on them and count it as the resync's.
      sync
      # The runs the resync will copy, read from the store's map: committed first by a flush of
      # the master (fio's O_DIRECT writes sent none, and sync sends none to a raw device), as a
      # filesystem's fsync would have; the disable's commit then writes the state alone.
      sync "$master"
      local runs
      runs=$(node scripts/bench/resync-runs.mjs "$store" "$WORK/runs")
      resync=$(node scripts/bench/resync-time.mjs "$name")
      resync_bytes=$(node -e 'console.log(JSON.parse(process.argv[1]).bytes)' "$resync")
      # The source is the loop device's backing file, in the page cache like the change area that
      # the resync read (and no second copy of it on the RAM disk). dd runs twice: into a new
      # file, then over the blocks that first copy allocated, which is what the resync does (it
      # overwrites data-area blocks the fill allocated). The target is against the second: the
      # first times the file system's allocation too (280 MiB on 7.3, six rounds: 1.5-2.8 s into
      # a new file, 0.56-0.64 s over a written one; docs/benchmarks.md).
      local copies=()
      for conv in fsync notrunc,fsync; do
        sync
        t0=$(date +%s.%N)
        dd if="$WORK/loop.img" of="$WORK/dd-dst" bs=1M iflag=count_bytes count="$resync_bytes" conv=$conv status=none
        t1=$(date +%s.%N)
        copies+=("$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')")
      done
      rm -f "$WORK/dd-dst"
      # The same runs copied by a program that does nothing else (scripts/bench/copy-runs.c, built
      # by device.ts): a blocking read and write per run, then an fdatasync, into the loop
      # device's file at the runs' own offsets, over blocks written before. Nothing uses the loop
      # device now, and its jobs do not care what its blocks hold.
      sync
      local copied
      copied=$("$COPY_RUNS" "$store" "$WORK/loop.img" "$WORK/runs")
      rm -f "$WORK/runs"
      echo "{\"round\":$round,\"resync\":$resync,\"dd_new_seconds\":${copies[0]},\"dd_seconds\":${copies[1]},\"runs\":$runs,\"runs_copy\":$copied}"
    else
      cldd disable "$name" --wait >&2
    fi
  done
  # Written all over: a snapshot whose every block is written once (the whole change area), then
  # merged back, before the same jobs. The master's contents change; the jobs do not care.
  local any=""
  for job in "${FIRST_TOUCH[@]}"; do set -- $job; wanted "$(written "$1")" && any=1; done
  if [ -n "$any" ]; then
    cldd enable "$name" --no-freeze >&2
    dd if=/dev/zero of="$master" bs=1M count=$((bytes / 1048576)) oflag=direct status=none
    cldd disable "$name" --wait >&2
    sync
    for job in "${FIRST_TOUCH[@]}"; do
      set -- $job
      local label
      label=$(written "$1")
      wanted "$label" || continue
      cldd enable "$name" --no-freeze >&2
      PHASE=after run "$label" "$2" "$3" "$4" "$master" cldd "$round" "${@:5}"
      cldd disable "$name" --wait >&2
    done
  fi
  # Changed-block tracking: the pair is plain now, in the period the last enable started, where
  # no chunk is marked yet, so each 4 KiB write at QD1 to a chunk not yet written in it waits
  # for the commit of its mark; then, once a sequential pass has written (marked) every chunk,
  # the same job, as every plain row of the next round finds the pair.
  # The pass runs whichever jobs were asked for: the next round's rows need every chunk marked.
  # The new period's job runs as an "after" job, so without a ramp: its first writes, the first
  # of the period, are the ones it is there to count. At QD1 it ends at its runtime, long before
  # half a pass.
  wanted tracking-randwrite-4k-qd1 && PHASE=after run tracking-randwrite-4k-qd1 randwrite 4k 1 "$master" cldd "$round"
  dd if=/dev/zero of="$master" bs=1M count=$((bytes / 1048576)) oflag=direct status=none
  wanted tracking-randwrite-4k-qd1 && PHASE=before run tracking-randwrite-4k-qd1 randwrite 4k 1 "$master" cldd "$round"
  return 0
}

# dm-snapshot beside it: a persistent snapshot with 4 KiB chunks (8 sectors) of the loop device,
# its exception store on another loop device over a fresh file on the same file system. No udev in
# the VM: dmsetup neither waits for it nor needs it (devtmpfs makes /dev/dm-N).
dm() { dmsetup --noudevsync "$@"; }
dm_dev() { echo "/dev/dm-$(dm info -c --noheadings -o minor "$1" | tr -d ' ')"; }
first_touch_dm() { # round
  local sectors=$((bytes / 512)) job origin cow label
  dm create cldd-bench-origin --table "0 $sectors snapshot-origin $loop"
  origin=$(dm_dev cldd-bench-origin)
  for job in "${FIRST_TOUCH[@]}"; do
    set -- $job
    wanted "$1" || wanted "$(written "$1")" || continue
    PHASE=before run "$1" "$2" "$3" "$4" "$origin" dm-snapshot "$round" "${@:5}"
  done
  # Its exception store a fresh sparse file (never written), or one written all over with zeros
  # (a zeroed store is a new one to dm-snapshot).
  for condition in new written; do
    for job in "${FIRST_TOUCH[@]}"; do
      set -- $job
      label=$1
      [ $condition = written ] && label=$(written "$1")
      wanted "$label" || continue
      rm -f "$WORK/dm-cow.img"
      if [ $condition = new ]; then
        truncate -s "$bytes" "$WORK/dm-cow.img"
      else
        dd if=/dev/zero of="$WORK/dm-cow.img" bs=1M count=$((bytes / 1048576)) conv=fsync status=none
      fi
      cow=$(losetup --find --show "$WORK/dm-cow.img")
      dm suspend cldd-bench-origin
      dm create cldd-bench-snap --table "0 $sectors snapshot $loop $cow P 8"
      dm resume cldd-bench-origin
      PHASE=after run "$label" "$2" "$3" "$4" "$origin" dm-snapshot "$round" "${@:5}"
      dm remove cldd-bench-snap
      losetup -d "$cow"
      rm -f "$WORK/dm-cow.img"
    done
  done
  dm remove cldd-bench-origin
}

# What the file system's allocation alone costs the never-written condition: the kernel's loop
# device over a fresh sparse file of the same size ("after") against loop over its filled file
# ("before"), the same jobs. No server can make a first touch into blocks never written cheaper
# than this on this file system.
first_touch_loop() { # round
  local job sparse
  for job in "${FIRST_TOUCH[@]}"; do
    set -- $job
    wanted "$1" || continue
    PHASE=before run "$1" "$2" "$3" "$4" "$loop" loop "$round" "${@:5}"
    rm -f "$WORK/sparse.img"
    truncate -s "$bytes" "$WORK/sparse.img"
    sparse=$(losetup --find --show "$WORK/sparse.img")
    PHASE=after run "$1" "$2" "$3" "$4" "$sparse" loop "$round" "${@:5}"
    losetup -d "$sparse"
    rm -f "$WORK/sparse.img"
  done
}

# What a file system over the device does with fsync: ext4 made anew on the device, one writer of
# 4 KiB random writes through the page cache to a 64 MiB file, each followed by an fsync, as a
# database's log or a mail spool does. Each fsync is a journal commit, which ends in a FUA write
# (or a flush and a FUA write) to the device: the cost the raw QD1+fsync row has no part of.
# Made without discards (the devices stay filled) and with the inode tables and the journal
# written at once, so that no lazy initialisation writes during the job.
FS_MNT=/mnt/cldd-bench-fs
ext4_run() { # dev device-label round
  mkfs.ext4 -q -F -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 "$1"
  mkdir -p "$FS_MNT"
  mount "$1" "$FS_MNT"
  run ext4-randwrite-4k-fsync randwrite 4k 1 "$FS_MNT/fio.dat" "$2" "$3" --size=64M --ioengine=psync --direct=0 --fsync=1
  umount "$FS_MNT"
}

# ext4 in a snapshot, the users' case: a live file system written while its backup is taken. The
# job above on ext4 made on the first pair's master, just before and right after a snapshot
# (cldd enable, which freezes it), into a change area never written (its blocks given back to
# the file system first, as in a file store's first snapshot). In the snapshot's first seconds
# nearly every write is a first touch, the journal's blocks too, and each fsync's journal commit
# ends in a FUA write of one. dm-snapshot beside it the same way: ext4 on its origin over the
# loop device, a fresh sparse exception store, the snapshot made with the file system mounted
# (dmsetup suspend freezes it).
EXT4_SNAPSHOT=ext4-in-snapshot-randwrite-4k-fsync
ext4_snapshot_job() { # device-label round
  run "$EXT4_SNAPSHOT" randwrite 4k 1 "$FS_MNT/fio.dat" "$1" "$2" --size=64M --ioengine=psync --direct=0 --fsync=1
}
ext4_snapshot_cldd() { # round
  local name=bench-${MODES%% *} change_offset
  change_offset=$(od -An -t u8 -j 88 -N 8 "$WORK/$name.img" | tr -d ' ')
  mkfs.ext4 -q -F -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 "$master"
  mkdir -p "$FS_MNT"
  mount "$master" "$FS_MNT"
  PHASE=before ext4_snapshot_job cldd "$1"
  fallocate --punch-hole --offset "$change_offset" --length "$bytes" "$WORK/$name.img"
  cldd enable "$name" >&2
  PHASE=after ext4_snapshot_job cldd "$1"
  umount "$FS_MNT"
  cldd disable "$name" --wait >&2
}
ext4_snapshot_dm() { # round
  local sectors=$((bytes / 512)) origin cow
  dm create cldd-bench-origin --table "0 $sectors snapshot-origin $loop"
  origin=$(dm_dev cldd-bench-origin)
  mkfs.ext4 -q -F -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 "$origin"
  mkdir -p "$FS_MNT"
  mount "$origin" "$FS_MNT"
  PHASE=before ext4_snapshot_job dm-snapshot "$1"
  rm -f "$WORK/dm-cow.img"
  truncate -s "$bytes" "$WORK/dm-cow.img"
  cow=$(losetup --find --show "$WORK/dm-cow.img")
  dm suspend cldd-bench-origin
  dm create cldd-bench-snap --table "0 $sectors snapshot $loop $cow P 8"
  dm resume cldd-bench-origin
  PHASE=after ext4_snapshot_job dm-snapshot "$1"
  umount "$FS_MNT"
  dm remove cldd-bench-snap
  dm remove cldd-bench-origin
  losetup -d "$cow"
  rm -f "$WORK/dm-cow.img"
}

for round in $(seq "$ROUNDS"); do
  for job in "randread-4k-qd1 randread 4k 1" "randread-4k-qd32 randread 4k 32" "randwrite-4k-qd1 randwrite 4k 1" \
             "randwrite-4k-qd32 randwrite 4k 32" "randwrite-4k-qd1-fsync randwrite 4k 1 --fsync=1" \
             "read-1m-seq read 1M 8" "write-1m-seq write 1M 8"; do
    set -- $job
    wanted "$1" || continue
    # Each round starts with another device, so none always follows the same job's writeback.
    for ((i = 0; i < ${#devices[@]}; i++)); do
      d=${devices[(i + round - 1) % ${#devices[@]}]}
      run "$1" "$2" "$3" "$4" "${d#*=}" "${d%%=*}" "$round" "${@:5}"
    done
  done
  if wanted ext4-randwrite-4k-fsync; then
    for ((i = 0; i < ${#devices[@]}; i++)); do
      d=${devices[(i + round - 1) % ${#devices[@]}]}
      ext4_run "${d#*=}" "${d%%=*}" "$round"
    done
  fi
  if wanted "$EXT4_SNAPSHOT"; then
    if [ $((round % 2)) = 1 ]; then ext4_snapshot_cldd "$round"; ext4_snapshot_dm "$round"; else ext4_snapshot_dm "$round"; ext4_snapshot_cldd "$round"; fi
  fi
  # Alternately first, like the devices above.
  if [ $((round % 2)) = 1 ]; then first_touch_cldd; first_touch_dm; first_touch_loop; else first_touch_loop; first_touch_dm; first_touch_cldd; fi
  df -h "$WORK" >&2
done
# Each daemon's memory after all of the above: resident now and at its peak.
for mode in $MODES; do
  pid=$(cldd status "bench-$mode" --json | node -e 'let s = ""; process.stdin.on("data", (d) => (s += d)).on("end", () => { const j = JSON.parse(s); console.log((Array.isArray(j) ? j[0] : j).pid); });')
  [ "$mode" = zero-copy ] && label=cldd || label=cldd-copy
  # RssFile is mostly node's own binary, mapped (42 MiB of it on 6.12 right after start).
  awk -v d="$label" '/^VmRSS:/ { rss = $2 } /^VmHWM:/ { hwm = $2 } /^RssAnon:/ { anon = $2 } /^RssFile:/ { file = $2 }
    END { printf "{\"rss\":{\"device\":\"%s\",\"rss_kib\":%d,\"hwm_kib\":%d,\"anon_kib\":%d,\"file_kib\":%d}}\n", d, rss, hwm, anon, file }' "/proc/$pid/status"
done
losetup -d "$loop"
[ -n "$UBLKSRV" ] && "$UBLKSRV" del -n 9 >&2
for mode in $MODES; do cldd remove "bench-$mode" >&2; done
