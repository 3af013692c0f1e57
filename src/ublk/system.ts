/** The addon's system calls for the daemon: sd_notify and filesystem freeze/thaw. */
import type { Freezer } from '../daemon/freeze.js';
import { addon, nativeError } from './addon.js';

/** sd_notify(3) to NOTIFY_SOCKET; nothing when the process does not run under systemd. */
export function sdNotify(message: string, socket = process.env.NOTIFY_SOCKET): void {
  if (!socket) return;
  try {
    addon().notify(socket, message);
  } catch (err) {
    throw nativeError(err);
  }
}

/**
 * FIFREEZE / FITHAW as ioctls on a worker thread. (Freezing writes back dirty data to the
 * master, which this process serves: the main thread must stay free while it waits.)
 */
export const ioctlFreezer: Freezer = {
  freeze: (mountpoint) => addon().freeze(mountpoint).catch((err: unknown) => Promise.reject(nativeError(err))),
  thaw: (mountpoint) => addon().thaw(mountpoint).catch((err: unknown) => Promise.reject(nativeError(err))),
};
