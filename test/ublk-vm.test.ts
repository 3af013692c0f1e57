/**
 * Real ublk devices, served by the cldd daemon and driven with the cldd command
 * (test/fixtures/ublk-vm-checks.sh): natively where the host has /dev/ublk-control, else in
 * throwaway VMs (scripts/vm/run.sh), once on the harness's default kernel (Debian's 6.12, which
 * copies every request through the daemon) and once on a kernel with zero copy (Debian's
 * trixie-backports, Linux 6.16+). TCG is slow, so the data sizes are modest. Each check runs
 * under a time limit; one that does not finish, or during which the kernel oopses, fails with
 * a dump of the blocked tasks. Full output: $TMPDIR/cldd-ublk-vm*.log.
 */
import { describe } from 'vitest';
import { deviceChecks } from './support/vm-checks.js';

const DATA_CHECKS = {
  filesystem:
    "two queues, each one's thread pinned to a CPU whose requests go to the other; mkfs.ext4 on the master, files written and read back, e2fsck clean; cldd remove deletes both devices; cldd add again finds the files",
  slave:
    'the slave shows the enable-time image while the master takes raw writes; read-only; disable refused (EBUSY) while the slave is held open; resync; plain after remove + add',
  discard:
    'a file deleted and trimmed (fstrim) on the mounted master in a snapshot: the slave keeps it; once resynced its space is back in the backing file; e2fsck clean',
  blockdev:
    'a pair on a loop device: the master takes discards, fstrim gives space back under it; on brd (no write zeroes) the master takes none, fstrim says so, zeroing works; no request fails',
  fio: 'fio --verify=crc32c on the raw master, mixed sizes, iodepth 32, two queues',
  zero_copy: 'zero copy exactly where the kernel has it and it is not turned off; fio verify passes with and without it',
  reads:
    'reads served with their commit in one chain of ring entries, or the ordinary way when the page cache holds none or part of a request: the data written, on master and slave, in both copy modes',
  poll: 'a queue thread polls for the next request before it sleeps: QD1 reads caught by polls, the last poll runs out, the data intact in both copy modes; --poll-us 0 polls never',
  stall:
    'QD32 random writes never stall through enable/disable cycles: plain, with fsync, held across the enable, first touches, into the resync',
  bounds:
    'START_DEV and END_USER_RECOVERY with a tag never fetched give up within their bound, and at once when the kernel refuses the fetches (the device deleted, or kept for the next takeover); STOP_DEV with a request held in the engine gives up naming it, and stops once it is let go',
  sync_error:
    'a flush over a backing device that fails (device-mapper\'s error target) fails, and so does every flush after it once the device answers again: the write before it is never acknowledged; the daemon\'s log says why',
  backup:
    'cldd backup of a live ext4 under a writer: full, then incremental; TARGET equals the slave (sha256, e2fsck over a loop device), the incremental copies every differing region and no more than the writes; killed mid-copy and rerun; foreign and other-pair TARGETs refused and unchanged',
};

/**
 * brd, for `blockdev`'s pair on a device that cannot zero a range without writing it; dm_mod,
 * for `sync_error`'s backing device that fails on request (the error target).
 */
const BRD = { CLDD_VM_MODULES: 'brd:rd_nr=1,rd_size=1048576 dm_mod' };

describe('ublk devices in the kernel', () => {
  deviceChecks(
    'test/fixtures/ublk-vm-checks.sh',
    {
      ...DATA_CHECKS,
      bad_input: 'data without a signature at the end and an existing too-small file are refused and left byte-identical',
    },
    'cldd-ublk-vm.log',
    { vmEnv: BRD },
  );
});

// The SIGKILL-under-fio check ("recovery") runs here only: the 6.12 kernel sometimes oopses in
// it (see the script), a ublk race that newer kernels have fixed.
describe('ublk devices in a kernel with zero copy (Linux 6.16+)', () => {
  deviceChecks(
    'test/fixtures/ublk-vm-checks.sh',
    {
      ...DATA_CHECKS,
      recovery:
        'SIGKILL of the daemon with fio writes in flight on a mounted ext4; cldd add reattaches (user recovery); every write verifies and e2fsck passes',
    },
    'cldd-ublk-vm-zc.log',
    { vmEnv: { ...BRD, CLDD_VM_SUITE: 'trixie-backports' } },
  );
});
