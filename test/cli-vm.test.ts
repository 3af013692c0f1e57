/**
 * The administrator's tool on real devices (test/fixtures/cli-vm-checks.sh), through the cldd
 * and clddsetup commands exactly as a user runs them. Full output: $TMPDIR/cldd-cli-vm.log.
 */
import { describe } from 'vitest';
import { deviceChecks } from './support/vm-checks.js';

describe('cldd on real devices', () => {
  deviceChecks(
    'test/fixtures/cli-vm-checks.sh',
    {
      walkthrough:
        'add, mkfs, mount, enable with freeze under a writer, slave shows the enable-time files, disable --wait, fsck, remove, re-add',
      unmount_sequence: "the original's sequence: unmount, enable, mount master and slave, disable",
      clddsetup: 'clddsetup -m, status, -e, -d with /dev/cldmN and /dev/cldsN',
      refusals:
        'foreign data, missing, too small, bad options and block size (nothing created), swap over a store, attached, running, mounted, enabled twice, wrong name, not root (enable, list)',
      restart:
        'the daemon runs without transparent huge pages; SIGKILL of it under a writer; cldd add again reattaches the same live device, nothing lost',
      restart_raw:
        'raw writes acknowledged but never flushed survive SIGKILL of the daemon, in snapshot and mid-resync (map journal); O_DIRECT read-back',
      restart_stale:
        'SIGKILL with the state file behind the slave (as a full /run leaves it): the restart takes over the slave the dead daemon served, and starts when the one named is gone',
      persist: 'add --persist writes the configuration and enables cldd@NAME; remove undoes it',
      readiness: 'sd_notify: READY=1 only once the devices exist and the socket listens; WATCHDOG=1; STOPPING=1 on SIGTERM',
    },
    'cldd-cli-vm.log',
  );
});
