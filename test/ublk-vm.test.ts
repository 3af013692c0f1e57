/**
 * Real ublk devices, served by the device server (test/fixtures/ublk-vm-checks.sh): natively
 * where the host has /dev/ublk-control, else in one throwaway VM (scripts/vm/run.sh); TCG is
 * slow, so the data sizes are modest. Full output: $TMPDIR/cldd-ublk-vm.log.
 */
import { describe } from 'vitest';
import { deviceChecks } from './helpers/vm-checks.js';

describe('ublk devices in the kernel', () => {
  deviceChecks(
    'test/fixtures/ublk-vm-checks.sh',
    {
      filesystem: 'mkfs.ext4 on the master, files written and read back, e2fsck clean, stop + delete, re-add finds the files',
      slave: 'the slave shows the enable-time image while the master takes writes; read-only; busy slave refuses disable; resync',
      fio: 'fio --verify=crc32c on the raw master, mixed sizes, iodepth 32, two queues',
      bad_input: 'missing, too small, foreign and already attached backing files are refused',
    },
    'cldd-ublk-vm.log',
  );
});
