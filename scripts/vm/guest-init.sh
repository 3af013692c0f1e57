#!/bin/sh
# /init of the cldd test VM (busybox sh, runs as PID 1 from the initramfs).
#
# Loads the modules, mounts the host's / (9p, read-only) under a tmpfs overlay, runs the command
# that run.sh left in the per-run share (9p tag "cldd") inside a chroot of that overlay, writes its
# exit status to the share and powers off. The command's stdout and stderr end up in files in the
# share, which run.sh streams out; this script's own messages go to the console (ttyS0).
# A setup failure is written to share/error for run.sh to report.
export PATH=/bin
umask 022

log() { echo "init: $*"; }
halt() {
  # Bounded: a filesystem left dirty on a ublk device whose server is gone never syncs, and
  # nothing in the VM outlives it (the share is written through).
  sync &
  i=0
  while [ $i -lt 50 ] && kill -0 $! 2>/dev/null; do sleep 0.1; i=$((i + 1)); done
  poweroff -f
  sleep 10 # poweroff -f does not return; never let PID 1 exit (that panics)
}
fail() {
  log "error: $*"
  echo "$*" > /share/error 2>/dev/null
  halt
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/null >/dev/console 2>&1
log "kernel $(uname -r)"

while read -r mod params; do
  # A module may refuse to load (e.g. an accelerated crc32c on a CPU without the instruction);
  # what really matters is checked below.
  # shellcheck disable=SC2086 # the parameters are separate words
  insmod "/lib/modules/$mod" $params || log "insmod $mod failed"
done < /lib/modules/order

mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 cldd /share \
  || { log "cannot mount the run share"; halt; }

# The host's / is read-only and does not change under us during a run: cache it loosely.
mkdir -p /mnt/host /mnt/rw
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose,ro hostroot /mnt/host \
  || fail "cannot mount the host's / (9p)"
mount -t tmpfs -o mode=755 rw /mnt/rw || fail "cannot mount the overlay's tmpfs"
mkdir -p /mnt/rw/upper /mnt/rw/work
mount -t overlay -o lowerdir=/mnt/host,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work overlay /newroot \
  || fail "cannot mount the overlay on the host's /"

cwd=$(cat /share/cwd)
r=/newroot
mount -t proc proc $r/proc
mount -t sysfs sysfs $r/sys
mount -t devtmpfs devtmpfs $r/dev
mkdir -p $r/dev/pts $r/dev/shm
mount -t devpts devpts $r/dev/pts
mount -t tmpfs -o mode=1777 shm $r/dev/shm
ln -sf /proc/self/fd $r/dev/fd
ln -sf /proc/self/fd/0 $r/dev/stdin
ln -sf /proc/self/fd/1 $r/dev/stdout
ln -sf /proc/self/fd/2 $r/dev/stderr
mount -t tmpfs -o mode=755 run $r/run
# A fresh /tmp, unless the caller works inside the host's /tmp: then keep it (in the overlay).
case "$cwd/" in
  /tmp/*) ;;
  *) mount -t tmpfs -o mode=1777 tmp $r/tmp ;;
esac
[ -c $r/dev/ublk-control ] || fail "/dev/ublk-control is missing (ublk_drv did not load)"
[ -d "$r$cwd" ] || fail "the working directory $cwd does not exist in the VM"
hostname cldd-vm
ip link set lo up 2>/dev/null

cp /share/cmd.sh $r/run/cldd-vm-cmd.sh
# The command writes into pipes, as it would on the host; cat relays them into the share files
# that run.sh streams out. A 9p write returns only once the host has the data, so nothing is lost
# at power-off. (Files as the command's stdout would be truncated by a "> /dev/stdout" in it.)
mkfifo /stdout.fifo /stderr.fifo
cat /stdout.fifo >>/share/stdout &
out_relay=$!
cat /stderr.fifo >>/share/stderr &
err_relay=$!
log "running the command"
# From here on a failure is the command's, not the boot's (run.sh boots again only before this).
: > /share/started
env -i /bin/chroot $r /bin/sh /run/cldd-vm-cmd.sh </dev/null >/stdout.fifo 2>/stderr.fifo
status=$?

# Processes the command left running would hold the pipes open forever: stop them (the VM is
# about to stop anyway) until both relays have copied everything and ended. The loop runs on
# builtins, so none of its own processes is alive while it kills.
relay_done() {
  read -r _ _ state _ 2>/dev/null </proc/$1/stat || return 0
  [ "$state" = Z ]
}
rounds=0
until relay_done $out_relay && relay_done $err_relay; do
  for proc in /proc/[0-9]*; do
    pid=${proc#/proc/}
    case "$pid" in 1|$out_relay|$err_relay) continue ;; esac
    cmdline=""
    read -r cmdline 2>/dev/null <$proc/cmdline
    [ -n "$cmdline" ] && kill -KILL $pid 2>/dev/null # kernel threads and zombies have none
  done
  rounds=$((rounds + 1))
  [ $rounds -lt 200 ] || { log "the output relays did not finish; output may be cut"; break; }
  sleep 0.05
done
log "command exited with $status"
echo "$status" > /share/status.tmp && mv /share/status.tmp /share/status
halt
