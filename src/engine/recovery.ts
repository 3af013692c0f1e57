/**
 * Opening a store is its recovery: this module reads both superblock copies and every map page,
 * and chooses the versions that win (docs/format.md says which and why). It only reads; Volume
 * decides what to rewrite, and check reports what it found.
 */
import { CldError } from '../errors.js';
import type { BlockStore } from '../store/block-store.js';
import {
  decodeMapSlot,
  decodeSuperblock,
  MAP_SLOT_HEADER,
  MAX_BLOCK_SIZE,
  MIN_BLOCK_SIZE,
  mapSlotOffset,
  superblockOffset,
  type MapSlotFault,
  type Superblock,
  type SuperblockVerdict,
} from './format.js';

/** Map pages read or written with one request. */
export const MAP_IO_PAGES = 256;

export interface FoundSuperblock {
  sb: Superblock;
  copy: number;
  /** Whether the other copy holds the same superblock (else open rewrites both). */
  otherCurrent: boolean;
}

export interface SuperblockCopyReport {
  copy: number;
  offset: number;
  valid: boolean;
  generation?: number;
  reason?: string;
}

/**
 * Reads both superblock copies. Copy 0 sits at offset 0 and copy 1 one block later; when copy 0
 * is unreadable the block size is unknown, so every allowed block size is tried for copy 1.
 */
export async function readSuperblocks(store: BlockStore): Promise<FoundSuperblock & { reports: SuperblockCopyReport[] }> {
  const reports: SuperblockCopyReport[] = [];
  const valid: { sb: Superblock; copy: number }[] = [];
  let sawSignature = false;
  const readAt = async (offset: number): Promise<Uint8Array | null> => {
    if (offset + 512 > store.size) return null;
    const buf = new Uint8Array(512);
    await store.read(buf, offset);
    return buf;
  };
  const first = await readAt(0);
  const v0: SuperblockVerdict = first ? decodeSuperblock(first) : { ok: false, kind: 'foreign', reason: 'store too small' };
  if (v0.ok) valid.push({ sb: v0.sb, copy: 0 });
  else sawSignature ||= v0.kind !== 'foreign';
  reports.push({ copy: 0, offset: 0, valid: v0.ok, generation: v0.ok ? v0.sb.generation : undefined, reason: v0.ok ? undefined : v0.reason });

  const candidates = v0.ok ? [v0.sb.layout.blockSize] : [];
  if (!v0.ok) for (let bs = MIN_BLOCK_SIZE; bs <= MAX_BLOCK_SIZE; bs *= 2) candidates.push(bs);
  let copy1: SuperblockCopyReport | null = null;
  for (const bs of candidates) {
    const buf = await readAt(superblockOffset(1, bs));
    if (!buf) continue;
    const v = decodeSuperblock(buf);
    if (v.ok && v.sb.layout.blockSize === bs) {
      valid.push({ sb: v.sb, copy: 1 });
      copy1 = { copy: 1, offset: bs, valid: true, generation: v.sb.generation };
      break;
    }
    if (!v.ok && v.kind !== 'foreign') {
      sawSignature = true;
      copy1 ??= { copy: 1, offset: bs, valid: false, reason: v.reason };
    }
  }
  reports.push(copy1 ?? { copy: 1, offset: candidates[0] ?? MIN_BLOCK_SIZE, valid: false, reason: 'no cldd signature' });

  if (valid.length === 0) {
    if (!sawSignature) {
      throw new CldError('CLDD_FOREIGN', `${store.description} is not a cldd store (no cldd signature)`);
    }
    const why = reports.map((r) => `copy ${r.copy}: ${r.reason}`).join('; ');
    throw new CldError('CLDD_CORRUPT', `${store.description}: both superblock copies are damaged (${why})`);
  }
  valid.sort((a, b) => b.sb.generation - a.sb.generation || a.copy - b.copy);
  const best = valid[0];
  const other = valid[1];
  const otherCurrent =
    other !== undefined && Buffer.from(other.sb.uuid).equals(Buffer.from(best.sb.uuid)) && other.sb.generation === best.sb.generation;
  return { sb: best.sb, copy: best.copy, otherCurrent, reports };
}

export interface MapPageReport {
  page: number;
  slots: { valid: boolean; sequence?: number; kind?: MapSlotFault; reason?: string }[];
}

/**
 * Reads every map page and hands the newest valid slot to `use`. Throws CLDD_CORRUPT when a
 * page has no valid slot, unless `onDamaged` takes the report (check uses that to go on).
 */
export async function readMap(
  store: BlockStore,
  sb: Superblock,
  use: (page: number, slot: number, sequence: number, payload: Uint8Array, otherTorn: boolean) => void,
  onDamaged?: (report: MapPageReport) => void,
): Promise<void> {
  const { layout } = sb;
  const bs = layout.blockSize;
  for (let first = 0; first < layout.mapPages; first += MAP_IO_PAGES) {
    const count = Math.min(MAP_IO_PAGES, layout.mapPages - first);
    const chunk = new Uint8Array(2 * count * bs);
    await store.read(chunk, mapSlotOffset(layout, first, 0));
    for (let i = 0; i < count; i++) {
      const page = first + i;
      let best: { slot: number; sequence: number } | null = null;
      const report: MapPageReport = { page, slots: [] };
      for (let slot = 0; slot < 2; slot++) {
        const image = chunk.subarray((2 * i + slot) * bs, (2 * i + slot + 1) * bs);
        const v = decodeMapSlot(layout, sb.uuid, page, image);
        report.slots.push(v.ok ? { valid: true, sequence: v.header.sequence } : { valid: false, kind: v.kind, reason: v.reason });
        if (v.ok && (!best || v.header.sequence > best.sequence)) best = { slot, sequence: v.header.sequence };
      }
      if (!best) {
        if (onDamaged) {
          onDamaged(report);
          continue;
        }
        const why = report.slots.map((s, k) => `slot ${k}: ${s.reason}`).join('; ');
        throw new CldError('CLDD_CORRUPT', `${store.description}: map page ${page} has no valid copy (${why})`);
      }
      const image = chunk.subarray((2 * i + best.slot) * bs, (2 * i + best.slot + 1) * bs);
      const otherTorn = report.slots.some((s) => !s.valid && s.kind !== 'unused');
      use(page, best.slot, best.sequence, image.subarray(MAP_SLOT_HEADER), otherTorn);
      if (onDamaged && otherTorn) onDamaged(report);
    }
  }
}
