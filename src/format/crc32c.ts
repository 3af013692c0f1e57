/**
 * CRC-32C (Castagnoli), which guards every superblock copy and map page slot: the addon's
 * (native/checksum.cc, the CPU's instruction where it has one), since a commit checksums the
 * pages it writes on the way to the flush that waits for it.
 */
import { addon } from '../native/addon.js';
import type { NativeAddon } from '../native/native.js';

/** Loaded at the first checksum, so that commands which read no metadata never load the addon. */
let native: NativeAddon['crc32c'] | null = null;

/** The CRC of `data[start, end)`, continuing from `seed` (the CRC of the bytes before them). */
export function crc32c(data: Uint8Array, start = 0, end = data.length, seed = 0): number {
  native ??= addon().crc32c;
  return native(data, start, end, seed);
}
