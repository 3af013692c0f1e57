#!/usr/bin/env bash
# Runs a command inside a throwaway qemu VM that boots Debian's 6.12 kernel with ublk_drv loaded,
# and exits with the command's exit code. The VM sees the host's / read-only through 9p, under a
# tmpfs overlay: the command runs as root in the caller's working directory, and what it writes is
# gone when the VM stops. Its stdout and stderr stream to ours; the boot log does not (set
# CLDD_VM_VERBOSE=1 to see it). A failure of the harness itself prints one line starting with
# "vm: " and exits with 125.
#
# Usage: scripts/vm/run.sh [--mem MB] [--smp N] [--timeout SEC] -- CMD [ARGS...]
set -uo pipefail

readonly VM_FAILURE=125
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

fail() { echo "vm: $*" >&2; exit "$VM_FAILURE"; }
usage() {
  echo "usage: $0 [--mem MB] [--smp N] [--timeout SEC] -- CMD [ARGS...]" >&2
  exit "$VM_FAILURE"
}

mem=${CLDD_VM_MEM:-4096}
smp=${CLDD_VM_SMP:-2}
timeout=${CLDD_VM_TIMEOUT:-1800}
verbose=${CLDD_VM_VERBOSE:-0}
[ "$verbose" = 0 ] && verbose=""
# KVM is off by default: on some hosts /dev/kvm opens fine and then fails at the first
# instruction, which qemu does not fall back from. CLDD_VM_ACCEL=kvm opts in.
accel=${CLDD_VM_ACCEL:-tcg}
# qemu's CPU model; the device benchmark drops ERMS (see scripts/bench/device.ts).
cpu=${CLDD_VM_CPU:-max}

while [ $# -gt 0 ]; do
  case "$1" in
    --mem) mem=${2:-}; shift 2 || usage ;;
    --smp) smp=${2:-}; shift 2 || usage ;;
    --timeout) timeout=${2:-}; shift 2 || usage ;;
    --) shift; break ;;
    -h|--help) usage ;;
    *) break ;; # the command may also follow the options without "--"
  esac
done
[ $# -gt 0 ] || usage
for n in "$mem" "$smp" "$timeout"; do
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || fail "--mem, --smp and --timeout take positive integers, not '$n'"
done

command -v qemu-system-x86_64 >/dev/null \
  || fail "qemu-system-x86_64 is missing (package qemu-system-x86; run scripts/setup.sh)"
prepare_args=(--quiet)
[ -n "$verbose" ] && prepare_args=()
image=$("$here/prepare.sh" "${prepare_args[@]}") || exit "$VM_FAILURE" # it said why
cwd=$(pwd)

# Temporary directories of runs that were killed outright (SIGKILL leaves no chance to clean up).
for old in "${TMPDIR:-/tmp}"/cldd-vm.*; do
  [ -f "$old/owner" ] && [ ! -d "/proc/$(cat "$old/owner" 2>/dev/null)" ] && rm -rf "$old"
done
tmp=$(mktemp -d "${TMPDIR:-/tmp}/cldd-vm.XXXXXX") || fail "cannot create a temporary directory"
echo $$ > "$tmp/owner.new" && mv "$tmp/owner.new" "$tmp/owner" # never seen half-written
share=$tmp/share # the guest's only writable view of the host
mkdir "$share"
qemu_pid="" tail_pids=()
cleanup() {
  [ -n "$qemu_pid" ] && kill -KILL "$qemu_pid" 2>/dev/null
  [ ${#tail_pids[@]} -gt 0 ] && kill "${tail_pids[@]}" 2>/dev/null
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'fail "interrupted"' INT TERM HUP

# The command, as a POSIX sh script: arguments and environment survive any quoting because they
# never pass through the kernel command line or a shell word split.
quote() { printf "'%s'" "${1//\'/\'\\\'\'}"; }
{
  echo "# written by scripts/vm/run.sh"
  for name in $(compgen -e); do
    case "$name" in
      PATH|HOME|CI|TERM|LANG|LC_*|TZ|CLDD_*) ;;
      *) [[ " ${CLDD_VM_ENV:-} " == *" $name "* ]] || continue ;;
    esac
    [[ "$name" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || continue
    echo "export $name=$(quote "${!name}")"
  done
  echo "cd $(quote "$cwd") || exit $VM_FAILURE"
  printf 'exec'
  for arg in "$@"; do printf ' %s' "$(quote "$arg")"; done
  echo
} > "$share/cmd.sh"
printf '%s' "$cwd" > "$share/cwd"
: > "$share/stdout"
: > "$share/stderr"
: > "$tmp/console.log"

kernel=$image/vmlinuz
[ -f "$image/vmlinux" ] && kernel=$image/vmlinux # see prepare.sh
# Boot time under TCG is mostly the kernel's own initialisation: skip what a throwaway test VM
# does not need (crypto self-tests, jitter-entropy self-test, loading the kernel's signing
# certificates; the modules then load unverified, which only taints the kernel).
cmdline="console=ttyS0 panic=-1 rdinit=/init cryptomgr.notests"
cmdline+=" initcall_blacklist=jent_mod_init,load_system_certificate_list,init_encrypted,crypto_kdf108_init"
[ -n "$verbose" ] || cmdline+=" quiet"
# shellcheck disable=SC2054 # the commas are qemu's
qemu_args=(
  -machine q35 -accel "$accel" -cpu "$cpu" -m "$mem" -smp "$smp"
  -nodefaults -no-user-config -display none -monitor none -no-reboot
  -kernel "$kernel" -initrd "$image/initramfs.gz" -append "$cmdline"
  -serial "file:$tmp/console.log"
  -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap
  -virtfs "local,path=$share,mount_tag=cldd,security_model=none"
)
[ -n "$verbose" ] && echo "vm: qemu-system-x86_64 ${qemu_args[*]}" >&2
started=$SECONDS

# One boot: qemu until it exits or the timeout. Sets qemu_status.
boot() {
  : > "$tmp/console.log"
  # pdeathsig: qemu (and the timer below) die with us even if we are killed without a chance to
  # clean up.
  setpriv --pdeathsig KILL -- qemu-system-x86_64 "${qemu_args[@]}" </dev/null >"$tmp/qemu.log" 2>&1 &
  qemu_pid=$!
  # The guest writes the command's output into the share (each write completes on the host before
  # it returns, so nothing is lost when the VM powers off); tail streams it out as it grows.
  follow "$share/stdout" & tail_pids+=($!)
  follow "$share/stderr" >&2 & tail_pids+=($!)
  [ -n "$verbose" ] && { follow "$tmp/console.log" >&2 & tail_pids+=($!); }

  # Wait for qemu or the timeout, whichever comes first.
  setpriv --pdeathsig KILL -- sleep "$timeout" </dev/null >/dev/null 2>&1 & timer_pid=$!
  local finished=""
  while [ -z "$finished" ]; do
    wait -n -p finished "$qemu_pid" "$timer_pid"
    qemu_status=$?
    [ "$qemu_status" -eq 127 ] && [ -z "$finished" ] && finished=$qemu_pid # nothing left to wait for
  done
  if [ "$finished" = "$timer_pid" ]; then
    kill -KILL "$qemu_pid" 2>/dev/null
    wait "$qemu_pid" 2>/dev/null
    qemu_pid=""
    wait "${tail_pids[@]}" 2>/dev/null
    fail "timed out after $timeout s (set --timeout or CLDD_VM_TIMEOUT); the command did not finish"
  fi
  kill "$timer_pid" 2>/dev/null
  qemu_pid=""
  # The tails exit on their own once qemu is gone, after copying what is left.
  wait "${tail_pids[@]}" 2>/dev/null
  tail_pids=()
}
follow() { tail -c +1 -s 0.1 -f --pid="$qemu_pid" "$1"; }

# A guest kernel that panics while booting, before the command started, is the emulator's or the
# guest kernel's failure, not the command's: seen once in CI under TCG ("Fatal exception in
# interrupt" about 3 s into the boot). It gets one more boot, with a note; the command never
# runs twice (the guest marks the share before it starts it).
for attempt in 1 2; do
  boot
  [ -f "$share/status" ] || [ -f "$share/started" ] || [ -f "$share/error" ] && break
  grep -q 'Kernel panic' "$tmp/console.log" || break
  [ "$attempt" = 2 ] && break
  echo "vm: note: the guest kernel panicked while booting ($(grep -m 1 'Kernel panic' "$tmp/console.log" \
    | sed -E 's/^\[ *[0-9.]+\] //' | tr -d '\r')); booting again" >&2
  cp "$tmp/console.log" "$tmp/console.1.log"
done
[ -n "$verbose" ] && echo "vm: the VM ran for $((SECONDS - started)) s" >&2

if [ -f "$share/status" ]; then
  status=$(cat "$share/status")
  [[ "$status" =~ ^[0-9]+$ ]] && exit "$status"
  fail "the guest reported a malformed exit status '$status'"
fi
[ -f "$share/error" ] && fail "the guest could not run the command: $(head -n 1 "$share/error")"
if [ "$qemu_status" -ne 0 ]; then
  fail "qemu failed (exit code $qemu_status): $(tail -n 3 "$tmp/qemu.log" | tr '\n' ' ')"
fi
# The likeliest cause on the console: a panic, else init's last word, else the last line.
reason=$(grep -m 1 'Kernel panic' "$tmp/console.log" || grep 'init: ' "$tmp/console.log" | tail -n 1 \
  || grep . "$tmp/console.log" | tail -n 1)
reason=$(sed -E 's/^\[ *[0-9.]+\] //' <<<"$reason" | tr -d '\r')
# A panic's oops is what anyone will need: the 40 lines before it, on stderr.
if grep -q 'Kernel panic' "$tmp/console.log"; then
  echo "vm: the guest console before the panic:" >&2
  grep -B 40 -m 1 'Kernel panic' "$tmp/console.log" | tr -d '\r' | sed 's/^/vm:   /' >&2
fi
fail "the VM stopped without reporting the command's exit status${reason:+ (console: $reason)}; CLDD_VM_VERBOSE=1 shows the boot log"
