/** The daemon's system calls: sd_notify, filesystem freeze/thaw, block queue settings, memory. */
import { access, readFile, realpath, writeFile } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import type { Freezer } from './freeze.js';
import { devId } from '../devnum.js';
import { asCldError } from '../errors.js';
import { addon } from '../native/addon.js';

/** sd_notify(3) to NOTIFY_SOCKET; nothing when the process does not run under systemd. */
export function sdNotify(message: string, socket = process.env.NOTIFY_SOCKET): void {
  if (!socket) return;
  try {
    addon().notify(socket, message);
  } catch (err) {
    throw asCldError(err);
  }
}

/**
 * The daemon's memory settings, made before it serves anything. Where the kernel gives anonymous
 * memory huge pages unasked (THP "always", as in the test VM's Debian kernels), each 2 MiB region
 * that malloc's arenas or V8's heap touch a page of becomes resident whole: they are turned off
 * for this process (PR_SET_THP_DISABLE). The daemon allocates little and keeps it long; its data
 * moves in blocks of 4 KiB to 1 MiB, so huge pages would save it few TLB misses. And malloc maps
 * blocks of 128 KiB or more on their own for good (glibc's default threshold, which it otherwise
 * raises to the size of each large block freed, such as the resync's 4 MiB copy buffer, keeping
 * that much more free space in its heap before it gives any back).
 * Measured in 7.3 VMs after the same jobs and six snapshot cycles, resident at the end (peak):
 * 73.3-75.4 MiB (73.6-77.0) with neither, 70.5-71.6 (71.1-74.4) without huge pages, 68.1-69.4
 * (69.1-69.5) with both; two to four rounds each.
 */
export function limitDaemonMemory(): void {
  try {
    addon().disableHugePages();
    addon().fixMmapThreshold(MMAP_THRESHOLD);
  } catch (err) {
    throw asCldError(err);
  }
}

/** glibc's own default (M_MMAP_THRESHOLD, mallopt(3)), made fixed. */
const MMAP_THRESHOLD = 128 * 1024;

/**
 * Turns off the block layer's I/O scheduler of a device this process serves, as the loop driver
 * does for its own: requests are scheduled again on the backing file's device. The kernel gives
 * a single-queue ublk device mq-deadline, which in the VM cost 4 KiB random I/O at QD32 about
 * 45% of its rate and dispatched through kblockd workers (Linux 7.3).
 */
export async function disableScheduler(devicePath: string): Promise<void> {
  await writeFile(`/sys/block/${basename(devicePath)}/queue/scheduler`, 'none');
}

/**
 * FIFREEZE / FITHAW as ioctls on a worker thread. (Freezing writes back dirty data to the
 * master, which this process serves: the main thread must stay free while it waits.)
 */
export const ioctlFreezer: Freezer = {
  freeze: (mountpoint) => addon().freeze(mountpoint).catch((err: unknown) => Promise.reject(asCldError(err))),
  thaw: (mountpoint) => addon().thaw(mountpoint).catch((err: unknown) => Promise.reject(asCldError(err))),
};

/**
 * Whether the block device `rdev` can make a range read as zeros without writing it, as the
 * engine does for a discard or a write of zeros (a punch: native/store.cc): only where its queue
 * takes REQ_OP_WRITE_ZEROES (`queue/write_zeroes_max_bytes` above 0; a partition's is its
 * disk's), for a punch on a block device has no fallback. brd has none (6.12 VM), nor, commonly,
 * a SATA disk: there every discard the master passed on failed with EOPNOTSUPP and was counted
 * as an error while fstrim reported the space trimmed.
 */
export async function writesZeroes(rdev: number, sysfs = '/sys'): Promise<boolean> {
  let dir = await realpath(join(sysfs, 'dev', 'block', devId(rdev)));
  if (await access(join(dir, 'partition')).then(() => true, () => false)) dir = dirname(dir);
  return Number((await readFile(join(dir, 'queue', 'write_zeroes_max_bytes'), 'utf8')).trim()) > 0;
}
