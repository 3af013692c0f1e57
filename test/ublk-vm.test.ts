/**
 * Real ublk devices, served by the cldd daemon and driven with the cldd command
 * (test/fixtures/ublk-vm-checks.sh): natively where the host has /dev/ublk-control, else in one
 * throwaway VM (scripts/vm/run.sh); TCG is slow, so the data sizes are modest. Each check runs
 * under a time limit; one that does not finish, or during which the kernel oopses, fails with
 * a dump of the blocked tasks. The SIGKILL-under-fio check ("recovery") runs by name only: the
 * VM's kernel sometimes oopses in it (see the script). Full output: $TMPDIR/cldd-ublk-vm.log.
 */
import { describe } from 'vitest';
import { deviceChecks } from './helpers/vm-checks.js';

describe('ublk devices in the kernel', () => {
  deviceChecks(
    'test/fixtures/ublk-vm-checks.sh',
    {
      filesystem:
        'mkfs.ext4 on the master, files written and read back, e2fsck clean; cldd remove deletes both devices; cldd add again finds the files',
      slave:
        'the slave shows the enable-time image while the master takes raw writes; read-only; disable refused (EBUSY) while the slave is held open; resync; plain after remove + add',
      fio: 'fio --verify=crc32c on the raw master, mixed sizes, iodepth 32, two queues',
      bad_input: 'data without a signature at the end and an existing too-small file are refused and left byte-identical',
    },
    'cldd-ublk-vm.log',
  );
});
