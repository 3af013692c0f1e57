/**
 * Memory the daemon keeps for its life but needs only at times: the pages of a buffer whose bytes
 * are all zero, or no longer needed, go back to the kernel (MADV_DONTNEED) and read as zeros
 * until they are written again.
 */
import { asCldError } from '../errors.js';
import { addon } from '../native/addon.js';

/** Gives back the whole pages inside `bytes` (which must span its whole buffer). */
export function releasePages(bytes: Uint8Array): void {
  try {
    addon().releasePages(bytes);
  } catch (err) {
    throw asCldError(err);
  }
}
