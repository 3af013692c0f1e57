/**
 * The on-disk format of a cldd store: layout, superblock copies and map page slots.
 * docs/format.md specifies every byte and the ordering argument; this module is the only code
 * that encodes or decodes them.
 */
import { randomBytes } from 'node:crypto';
import { CldError } from '../errors.js';
import { crc32c } from './crc32c.js';

/**
 * The version this cldd formats. Version 1 stores are read, and upgraded to 2 by their first
 * commit; version 2 stores (no changed-block tracking: their data area starts right after the
 * map) are read and written as version 2.
 */
export const FORMAT_VERSION = 3;
/** The first version with changed-block tracking pages in the map area. */
export const TRACKING_VERSION = 3;
export const OLDEST_FORMAT_VERSION = 1;
export const SUPERBLOCK_MAGIC = 'cldd-sb\0';
export const MAP_SLOT_MAGIC = 'cldd-map';
export const SUPERBLOCK_COPIES = 2;
/** Bytes of a superblock copy that are defined and checksummed; the rest of its block is zero. */
export const SUPERBLOCK_BYTES = 512;
export const MAP_SLOT_HEADER = 64;
export const AREA_ALIGN = 1 << 20;
export const MIN_BLOCK_SIZE = 4096;
export const MAX_BLOCK_SIZE = 65536;
export const MIN_AREA_BYTES = 1 << 20;
export const NAME_BYTES = 64;
/**
 * Changed-block tracking counts 64 KiB chunks (at least one block): 16M chunks, 2 MiB of bits,
 * per TiB of master. A chunk's first write of a tracking period waits for a commit, so larger
 * chunks make that rarer; smaller ones copy less of a sparsely written chunk.
 */
export const CHUNK_SHIFT = 16;
/** Bytes at the start of a tracking page's payload: the period (snapshot number) it belongs to. */
export const TRACKING_PAGE_HEADER = 8;

export type VolumeState = 'plain' | 'snapshot' | 'resync';
const STATE_CODES: Record<VolumeState, number> = { plain: 0, snapshot: 1, resync: 2 };
const STATE_NAMES: VolumeState[] = ['plain', 'snapshot', 'resync'];

export interface Layout {
  blockSize: number;
  /** Store size the layout was computed for (bytes). */
  storeSize: number;
  /** Blocks in the data area, and in the change area: the master's capacity in blocks. */
  blocks: number;
  /** Redirect bits per map page. */
  bitsPerPage: number;
  mapOffset: number;
  /** Map pages holding redirect bits (pages 0 .. mapPages-1 of the map area). */
  mapPages: number;
  /**
   * Changed-block tracking (version 3; zero in an older store's layout): chunks of 2^chunkShift
   * bytes of the master, and the pages of one tracking set. The map area holds, after the
   * redirect pages, the pages of two sets (map pages mapPages + r x trackingPages + i, r = 0, 1):
   * set r tracks the periods whose snapshot number has parity r.
   */
  chunkShift: number;
  chunks: number;
  trackingBitsPerPage: number;
  trackingPages: number;
  dataOffset: number;
  changeOffset: number;
}

export interface Superblock {
  uuid: Uint8Array;
  generation: number;
  state: VolumeState;
  /** Number of times the slave was enabled (the snapshot's sequence number). */
  epoch: number;
  /** When the state last changed (ms since the Unix epoch). */
  stateChangedAt: number;
  createdAt: number;
  name: string;
  layout: Layout;
  /** The map of the last completed map commit; null in a version 1 superblock, which has none. */
  map: MapRecord | null;
  /** The superblock's format version (1, 2 or 3): the layout and the fields it has. */
  version: number;
}

/**
 * What a superblock records of the map: the number of the last map commit whose superblock
 * write completed, and the digest of the map that commit left (mapDigestTerm).
 */
export interface MapRecord {
  commit: number;
  digest: number;
}

const alignUp = (n: number, a: number) => Math.ceil(n / a) * a;

export function isValidBlockSize(blockSize: number): boolean {
  return (
    Number.isInteger(blockSize) &&
    blockSize >= MIN_BLOCK_SIZE &&
    blockSize <= MAX_BLOCK_SIZE &&
    (blockSize & (blockSize - 1)) === 0
  );
}

function layoutFor(storeSize: number, blockSize: number, blocks: number, version: number): Layout {
  const bitsPerPage = (blockSize - MAP_SLOT_HEADER) * 8;
  const mapOffset = SUPERBLOCK_COPIES * blockSize;
  const mapPages = Math.ceil(blocks / bitsPerPage);
  const tracked = version >= TRACKING_VERSION;
  const chunkShift = tracked ? Math.max(CHUNK_SHIFT, Math.log2(blockSize)) : 0;
  const chunks = tracked ? Math.ceil((blocks * blockSize) / 2 ** chunkShift) : 0;
  const trackingBitsPerPage = tracked ? (blockSize - MAP_SLOT_HEADER - TRACKING_PAGE_HEADER) * 8 : 0;
  const trackingPages = tracked ? Math.ceil(chunks / trackingBitsPerPage) : 0;
  const dataOffset = alignUp(mapOffset + 2 * (mapPages + 2 * trackingPages) * blockSize, AREA_ALIGN);
  const changeOffset = alignUp(dataOffset + blocks * blockSize, AREA_ALIGN);
  return {
    blockSize,
    storeSize,
    blocks,
    bitsPerPage,
    mapOffset,
    mapPages,
    chunkShift,
    chunks,
    trackingBitsPerPage,
    trackingPages,
    dataOffset,
    changeOffset,
  };
}

/** Pages in the map area, each with two slots: the redirect pages, then both tracking sets. */
export function metadataPages(layout: Layout): number {
  return layout.mapPages + 2 * layout.trackingPages;
}

/** The map page of page `i` of tracking set `set` (0 or 1). */
export function trackingPage(layout: Layout, set: number, i: number): number {
  return layout.mapPages + set * layout.trackingPages + i;
}

const fits = (l: Layout) => l.changeOffset + l.blocks * l.blockSize <= l.storeSize;

/**
 * The largest layout that fits a store: data and change areas as large as possible. Version 3
 * reserves the tracking pages in the map area; older versions' layouts have none.
 */
export function computeLayout(storeSize: number, blockSize: number, version = FORMAT_VERSION): Layout {
  if (!isValidBlockSize(blockSize)) {
    throw new CldError('EINVAL', `block size ${blockSize} is not a power of two from ${MIN_BLOCK_SIZE} to ${MAX_BLOCK_SIZE}`);
  }
  let lo = 0;
  let hi = Math.floor(storeSize / blockSize / 2);
  while (lo < hi) {
    const mid = Math.ceil((lo + hi) / 2);
    if (fits(layoutFor(storeSize, blockSize, mid, version))) lo = mid;
    else hi = mid - 1;
  }
  const layout = layoutFor(storeSize, blockSize, lo, version);
  if (lo * blockSize < MIN_AREA_BYTES || !fits(layout)) {
    const need = layoutFor(0, blockSize, Math.ceil(MIN_AREA_BYTES / blockSize), version);
    const minSize = need.changeOffset + MIN_AREA_BYTES;
    throw new CldError('CLDD_TOO_SMALL', `a store of ${storeSize} bytes is too small: cldd needs at least ${minSize} bytes`);
  }
  return layout;
}

export function newUuid(): Uint8Array {
  return new Uint8Array(randomBytes(16));
}

export function uuidString(uuid: Uint8Array): string {
  const h = Buffer.from(uuid).toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

export function superblockOffset(copy: number, blockSize: number): number {
  return copy * blockSize;
}

/** Offset of slot `slot` (0 or 1) of map page `page`. */
export function mapSlotOffset(layout: Layout, page: number, slot: number): number {
  return layout.mapOffset + (2 * page + slot) * layout.blockSize;
}

const encoder = new TextEncoder();
const decoder = new TextDecoder('utf-8', { fatal: true });

/**
 * Stores `n` as a little-endian u64 at `offset`. Every u64 field cldd writes is a count, an
 * offset or a number below 2^53, and a commit writes about twenty of them (its pages, their
 * digest terms, the superblock): two u32 stores, where a BigInt per field was an allocation.
 */
function putU64(v: DataView, offset: number, n: number): void {
  if (!Number.isSafeInteger(n) || n < 0) throw new CldError('EINVAL', `${n} is not a u64 field's value`);
  v.setUint32(offset, n % 0x100000000, true);
  v.setUint32(offset + 4, Math.floor(n / 0x100000000), true);
}

/** The signatures as bytes, encoded once: a commit writes them on each page it encodes. */
const SUPERBLOCK_MAGIC_BYTES = encoder.encode(SUPERBLOCK_MAGIC);
const MAP_SLOT_MAGIC_BYTES = encoder.encode(MAP_SLOT_MAGIC);

/** Encodes a superblock copy in its version (1 has no map record; 3 has the tracking fields). */
export function encodeSuperblock(sb: Superblock): Uint8Array {
  return encodeSuperblockInto(new Uint8Array(sb.layout.blockSize), sb);
}

/**
 * encodeSuperblock into `buf` (a block, whatever it held: every byte is written), which it
 * returns. A commit encodes into buffers it reuses (commit.ts): a new 4 KiB array per image was
 * an allocation outside V8's heap each, which the main thread pays on every flush.
 */
export function encodeSuperblockInto(buf: Uint8Array, sb: Superblock): Uint8Array {
  const { layout } = sb;
  if ((sb.version === 1) !== (sb.map === null) || (sb.version >= TRACKING_VERSION) !== (layout.trackingPages > 0)) {
    throw new CldError('EINVAL', `a version ${sb.version} superblock with${sb.map ? '' : 'out'} a map record and ${layout.trackingPages} tracking pages`);
  }
  if (buf.length !== layout.blockSize) throw new CldError('EINVAL', `a superblock image of ${buf.length} bytes, the block is ${layout.blockSize}`);
  buf.fill(0);
  const v = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  buf.set(SUPERBLOCK_MAGIC_BYTES, 0);
  v.setUint32(12, sb.version, true);
  buf.set(sb.uuid, 16);
  putU64(v, 32, sb.generation);
  v.setUint32(40, layout.blockSize, true);
  v.setUint32(44, STATE_CODES[sb.state], true);
  putU64(v, 48, layout.storeSize);
  putU64(v, 56, layout.blocks);
  putU64(v, 64, layout.mapOffset);
  putU64(v, 72, layout.mapPages);
  putU64(v, 80, layout.dataOffset);
  putU64(v, 88, layout.changeOffset);
  putU64(v, 96, sb.epoch);
  putU64(v, 104, sb.stateChangedAt);
  putU64(v, 112, sb.createdAt);
  const name = encoder.encodeInto(sb.name, buf.subarray(128, 128 + NAME_BYTES));
  if (name.read !== sb.name.length) throw new CldError('EINVAL', `name "${sb.name}" is longer than ${NAME_BYTES} bytes`);
  v.setUint32(124, name.written, true);
  if (sb.map) {
    putU64(v, 192, sb.map.commit);
    v.setUint32(200, sb.map.digest, true);
  }
  if (sb.version >= TRACKING_VERSION) v.setUint32(204, layout.chunkShift, true);
  v.setUint32(8, crc32c(buf, 12, SUPERBLOCK_BYTES), true);
  return buf;
}

/**
 * Why a superblock copy is not valid:
 *   foreign  no cldd signature: never written by cldd (or wiped);
 *   torn     the checksum does not match: a write interrupted by a crash, or damage;
 *   damaged  a complete write whose fields are impossible: damage, or a newer cldd.
 */
export type SuperblockFault = 'foreign' | 'torn' | 'damaged';

export type SuperblockVerdict = { ok: true; sb: Superblock } | { ok: false; kind: SuperblockFault; reason: string };

/** Decodes one superblock copy; says why it is not valid. */
export function decodeSuperblock(buf: Uint8Array): SuperblockVerdict {
  if (buf.length < SUPERBLOCK_BYTES) return { ok: false, kind: 'foreign', reason: 'shorter than a superblock' };
  const v = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const magic = Buffer.from(buf.subarray(0, 8)).toString('latin1');
  if (magic !== SUPERBLOCK_MAGIC) return { ok: false, kind: 'foreign', reason: 'no cldd signature' };
  const bad = (reason: string): SuperblockVerdict => ({ ok: false, kind: 'damaged', reason });
  if (v.getUint32(8, true) !== crc32c(buf, 12, SUPERBLOCK_BYTES)) return { ok: false, kind: 'torn', reason: 'checksum mismatch' };
  const version = v.getUint32(12, true);
  if (version < OLDEST_FORMAT_VERSION || version > FORMAT_VERSION) {
    return bad(`format version ${version} (this cldd reads versions ${OLDEST_FORMAT_VERSION} to ${FORMAT_VERSION})`);
  }
  // Every u64 field must fit a JavaScript number exactly; a larger one is damage, not NaN.
  const u64 = (off: number): number | null => {
    const x = v.getBigUint64(off, true);
    return x > BigInt(Number.MAX_SAFE_INTEGER) ? null : Number(x);
  };
  const fields: Record<string, number> = {};
  for (const [name, off] of version >= 2 ? [...U64_FIELDS, MAP_COMMIT_FIELD] : U64_FIELDS) {
    const x = u64(off);
    if (x === null) return bad(`${name} out of range`);
    fields[name] = x;
  }
  if (fields.generation < 1) return bad('generation 0');
  const blockSize = v.getUint32(40, true);
  if (!isValidBlockSize(blockSize)) return bad(`block size ${blockSize}`);
  const stateCode = v.getUint32(44, true);
  const state = STATE_NAMES[stateCode];
  if (!state) return bad(`state code ${stateCode}`);
  const { storeSize } = fields;
  let expected: Layout;
  try {
    expected = computeLayout(storeSize, blockSize, version);
  } catch {
    return bad(`recorded store size ${storeSize}`);
  }
  const recorded = [fields.blocks, fields.mapOffset, fields.mapPages, fields.dataOffset, fields.changeOffset];
  const computed = [expected.blocks, expected.mapOffset, expected.mapPages, expected.dataOffset, expected.changeOffset];
  if (recorded.some((x, i) => x !== computed[i])) return bad('layout fields disagree with the recorded store size');
  const flags = v.getUint32(120, true);
  if (flags !== 0) return bad(`unknown feature flags ${flags.toString(16)} (written by a newer cldd?)`);
  const nameLength = v.getUint32(124, true);
  if (nameLength > NAME_BYTES) return bad(`name length ${nameLength}`);
  let name: string;
  try {
    name = decoder.decode(buf.subarray(128, 128 + nameLength));
  } catch {
    return bad('name is not UTF-8');
  }
  if (!isZero(buf, 128 + nameLength, 192)) return bad('bytes after the name are not zero');
  if (version >= TRACKING_VERSION) {
    const chunkShift = v.getUint32(204, true);
    if (chunkShift !== expected.chunkShift) return bad(`chunk shift ${chunkShift} (this cldd tracks chunks of 2^${expected.chunkShift} bytes)`);
  }
  const reserved = version >= TRACKING_VERSION ? 208 : version >= 2 ? 204 : 192;
  if (!isZero(buf, reserved, SUPERBLOCK_BYTES)) return bad(`reserved bytes ${reserved}..${SUPERBLOCK_BYTES - 1} are not zero`);
  return {
    ok: true,
    sb: {
      uuid: buf.slice(16, 32),
      generation: fields.generation,
      state,
      epoch: fields.epoch,
      stateChangedAt: fields.stateChangedAt,
      createdAt: fields.createdAt,
      name,
      layout: expected,
      map: version >= 2 ? { commit: fields.mapCommit, digest: v.getUint32(200, true) } : null,
      version,
    },
  };
}

/** The superblock's u64 fields and their offsets. */
const U64_FIELDS: [string, number][] = [
  ['generation', 32],
  ['storeSize', 48],
  ['blocks', 56],
  ['mapOffset', 64],
  ['mapPages', 72],
  ['dataOffset', 80],
  ['changeOffset', 88],
  ['epoch', 96],
  ['stateChangedAt', 104],
  ['createdAt', 112],
];
const MAP_COMMIT_FIELD: [string, number] = ['mapCommit', 192];

function isZero(buf: Uint8Array, start: number, end: number): boolean {
  for (let i = start; i < end; i++) if (buf[i] !== 0) return false;
  return true;
}

export interface MapSlotHeader {
  sequence: number;
  page: number;
  /** The map commit that wrote the slot (0: format, or a version 1 store). */
  commit: number;
  /** The digest of the whole map as that commit left it. */
  mapDigest: number;
}

/** What a map page slot holds besides its signature and checksum, in encodeMapSlot's order. */
type MapSlotFields = [uuid: Uint8Array, page: number, sequence: number, payload: Uint8Array | null, commit?: number, mapDigest?: number];

/** Builds a map page slot image from the page's bitmap payload. */
export function encodeMapSlot(layout: Layout, ...fields: MapSlotFields): Uint8Array {
  return encodeMapSlotInto(new Uint8Array(layout.blockSize), ...fields);
}

/** encodeMapSlot into `buf`, a block whatever it held (every byte is written), which it returns. */
export function encodeMapSlotInto(buf: Uint8Array, ...[uuid, page, sequence, payload, commit = 0, mapDigest = 0]: MapSlotFields): Uint8Array {
  if (payload && payload.length > buf.length - MAP_SLOT_HEADER) {
    throw new CldError('EINVAL', `map page ${page}: a payload of ${payload.length} bytes in a slot of ${buf.length}`);
  }
  buf.fill(0);
  const v = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  buf.set(MAP_SLOT_MAGIC_BYTES, 0);
  putU64(v, 16, sequence);
  putU64(v, 24, page);
  buf.set(uuid, 32);
  putU64(v, 48, commit);
  v.setUint32(56, mapDigest, true);
  if (payload) buf.set(payload, MAP_SLOT_HEADER);
  v.setUint32(8, crc32c(buf, 12, buf.length), true);
  return buf;
}

/**
 * Why a map slot holds no version of its page:
 *   unused   never written for this store: all zero as format leaves it, or another store's;
 *   torn     an incomplete write: a crash while it was written, or damage;
 *   damaged  a complete write that cannot be this slot (another page's, impossible fields).
 */
export type MapSlotFault = 'unused' | 'torn' | 'damaged';

export type MapSlotVerdict = { ok: true; header: MapSlotHeader } | { ok: false; kind: MapSlotFault; reason: string };

export function decodeMapSlot(layout: Layout, uuid: Uint8Array, page: number, buf: Uint8Array): MapSlotVerdict {
  const bad = (kind: MapSlotFault, reason: string): MapSlotVerdict => ({ ok: false, kind, reason });
  if (buf.length !== layout.blockSize) return bad('damaged', `slot of ${buf.length} bytes`);
  const v = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  if (Buffer.from(buf.subarray(0, 8)).toString('latin1') !== MAP_SLOT_MAGIC) {
    // Format leaves unused slots all zero; anything else without the magic is a torn write or damage.
    return buf.every((b) => b === 0) ? bad('unused', 'no map signature') : bad('torn', 'damaged signature');
  }
  if (v.getUint32(8, true) !== crc32c(buf, 12, buf.length)) return bad('torn', 'checksum mismatch');
  if (!Buffer.from(buf.subarray(32, 48)).equals(Buffer.from(uuid))) return bad('unused', 'belongs to another store');
  const slotPage = v.getBigUint64(24, true);
  if (slotPage !== BigInt(page)) return bad('damaged', `labelled page ${slotPage}`);
  const sequence = v.getBigUint64(16, true);
  if (sequence > BigInt(Number.MAX_SAFE_INTEGER)) return bad('damaged', 'sequence out of range');
  if (sequence === 0n) return bad('damaged', 'sequence 0');
  const commit = v.getBigUint64(48, true);
  if (commit > BigInt(Number.MAX_SAFE_INTEGER)) return bad('damaged', 'commit out of range');
  if (!isZero(buf, 12, 16) || !isZero(buf, 60, MAP_SLOT_HEADER)) return bad('damaged', 'reserved header bytes are not zero');
  return { ok: true, header: { sequence: Number(sequence), page, commit: Number(commit), mapDigest: v.getUint32(56, true) } };
}

const termBytes = new Uint8Array(24);
const termView = new DataView(termBytes.buffer);

/**
 * A map page's term of the map digest: CRC-32C of (page, sequence, commit) as three u64. The
 * digest of a map is the sum of its pages' terms mod 2^32, so a commit updates it page by page.
 * A commit number is never reused, so the term names one write of the page.
 */
export function mapDigestTerm(page: number, sequence: number, commit: number): number {
  putU64(termView, 0, page);
  putU64(termView, 8, sequence);
  putU64(termView, 16, commit);
  return crc32c(termBytes);
}

/**
 * A tracking page's payload: the period it was written in (the snapshot number the set counts
 * from), then its chunk bits. The page of a set that was not written in the set's current period
 * holds an older period and counts as empty: starting a period rewrites nothing.
 */
export function encodeTrackingPayload(layout: Layout, period: number, bits: Uint32Array): Uint8Array {
  const buf = new Uint8Array(layout.blockSize - MAP_SLOT_HEADER);
  const v = new DataView(buf.buffer);
  putU64(v, 0, period);
  buf.set(new Uint8Array(bits.buffer, bits.byteOffset, bits.byteLength), TRACKING_PAGE_HEADER);
  return buf;
}

/** The period and bits of a tracking page's payload (the bits are a view into `payload`). */
export function decodeTrackingPayload(payload: Uint8Array): { period: number; bits: Uint8Array } {
  const v = new DataView(payload.buffer, payload.byteOffset, payload.byteLength);
  const period = v.getBigUint64(0, true);
  return {
    period: period > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(period),
    bits: payload.subarray(TRACKING_PAGE_HEADER),
  };
}
