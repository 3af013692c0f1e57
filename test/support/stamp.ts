/**
 * Self-verifying sector contents: every 512-byte sector written by a test carries its own
 * address and a version number, and the rest of it is a pattern derived from both. A read tells
 * which version each sector holds (0: zeros, -1: garbage) without keeping copies of the data.
 */
export const SECTOR = 512;
const MAGIC = 0x636c6464; // "cldd"

export function stampSector(buf: Uint8Array, at: number, sector: number, version: number): void {
  const v = new DataView(buf.buffer, buf.byteOffset + at, SECTOR);
  v.setUint32(0, MAGIC, true);
  v.setUint32(4, sector, true);
  v.setUint32(8, version, true);
  let x = (Math.imul(sector, 0x9e3779b1) ^ Math.imul(version, 0x85ebca6b) ^ 0x27d4eb2d) >>> 0 || 1;
  for (let i = 12; i < SECTOR; i += 4) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    v.setUint32(i, x >>> 0, true);
  }
}

/** Fills `length` bytes with stamped sectors for the sectors starting at `firstSector`. */
export function stamped(firstSector: number, sectors: number, version: number): Uint8Array {
  const buf = new Uint8Array(sectors * SECTOR);
  for (let i = 0; i < sectors; i++) stampSector(buf, i * SECTOR, firstSector + i, version);
  return buf;
}

const scratch = new Uint8Array(SECTOR);

/** The version a sector holds: 0 for zeros, -1 for anything that is not a stamp of this sector. */
export function versionOf(buf: Uint8Array, at: number, sector: number): number {
  let zero = true;
  for (let i = 0; i < SECTOR; i += 4) {
    if (buf[at + i] | buf[at + i + 1] | buf[at + i + 2] | buf[at + i + 3]) {
      zero = false;
      break;
    }
  }
  if (zero) return 0;
  const v = new DataView(buf.buffer, buf.byteOffset + at, SECTOR);
  if (v.getUint32(0, true) !== MAGIC || v.getUint32(4, true) !== sector) return -1;
  const version = v.getUint32(8, true);
  stampSector(scratch, 0, sector, version);
  for (let i = 0; i < SECTOR; i++) if (scratch[i] !== buf[at + i]) return -1;
  return version;
}
