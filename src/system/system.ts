/** The daemon's system calls: sd_notify, filesystem freeze/thaw, block queue settings, huge pages. */
import { writeFile } from 'node:fs/promises';
import { basename } from 'node:path';
import type { Freezer } from './freeze.js';
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
 * Turns off transparent huge pages for the daemon (PR_SET_THP_DISABLE), before it serves anything.
 * Where the kernel gives anonymous memory huge pages unasked (THP "always"), each 2 MiB region
 * that malloc's arenas or V8's heap touch a page of becomes resident whole. The daemon allocates
 * little and keeps it a long time; its data buffers are 4 KiB to 1 MiB requests, so huge pages
 * save it few TLB misses and cost it resident memory that users count.
 */
export function disableHugePages(): void {
  try {
    addon().disableHugePages();
  } catch (err) {
    throw asCldError(err);
  }
}

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
