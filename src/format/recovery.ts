/**
 * Opening a store is its recovery: this module reads both superblock copies and every map page,
 * and chooses the versions that win (docs/format.md says which and why). It only reads; Volume
 * decides what to rewrite, and check reports what it found.
 */
import { CldError } from '../errors.js';
import type { BlockStore } from '../io/block-store.js';
import {
  decodeMapSlot,
  decodeSuperblock,
  MAP_SLOT_HEADER,
  mapDigestTerm,
  MAX_BLOCK_SIZE,
  MIN_BLOCK_SIZE,
  mapSlotOffset,
  metadataPages,
  superblockOffset,
  type MapSlotFault,
  type MapSlotHeader,
  type Superblock,
  type SuperblockVerdict,
} from './format.js';

/** Map pages read or written with one request. */
export const MAP_IO_PAGES = 256;

export interface Finding {
  severity: 'error' | 'warning';
  message: string;
}

/**
 * The superblock copy that did not win: `same` holds the same state (it may be some map commits
 * behind, as map-only commits write one copy); anything else makes open rewrite both copies.
 */
export type OtherCopy = 'same' | 'older-state' | 'other-store' | 'invalid';

export interface FoundSuperblock {
  sb: Superblock;
  copy: number;
  other: OtherCopy;
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
    if (v.ok || v.kind !== 'foreign') {
      sawSignature = true;
      copy1 ??= { copy: 1, offset: bs, valid: false, reason: v.ok ? `records block size ${v.sb.layout.blockSize}` : v.reason };
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
  const best = valid[0].sb;
  const second = valid[1]?.sb;
  let other: OtherCopy = 'invalid';
  if (second && !Buffer.from(second.uuid).equals(Buffer.from(best.uuid))) other = 'other-store';
  else if (second) {
    const same =
      (second.map === null) === (best.map === null) &&
      second.state === best.state &&
      second.epoch === best.epoch &&
      second.stateChangedAt === best.stateChangedAt &&
      second.createdAt === best.createdAt &&
      second.name === best.name &&
      second.layout.storeSize === best.layout.storeSize;
    other = same ? 'same' : 'older-state';
  }
  return { sb: best, copy: valid[0].copy, other, reports };
}

/**
 * A slot as recovery saw it: the version chosen, an older valid one, one written by a commit
 * whose superblock write did not complete (future), or no version (unused, torn, damaged).
 */
export type SlotReport =
  | { kind: 'current' | 'older' | 'future'; sequence: number; commit: number }
  | { kind: MapSlotFault; reason: string };

export interface MapPageReport {
  page: number;
  slots: SlotReport[];
}

export interface RecoveredMap {
  /** The map commit the chosen slots make up: the superblock's, or a later complete one. */
  commit: number;
  /** The digest of the chosen slots. */
  digest: number;
  /** A complete commit newer than the superblock's record was adopted; open records it. */
  rolledForward: boolean;
  /** Above every commit number on disk, uncommitted ones included: the next commit's. */
  nextCommit: number;
  /** Per page: the chosen slot, its sequence and its commit. */
  slot: Uint8Array;
  sequence: Float64Array;
  slotCommit: Float64Array;
  /** Pages whose other slot is torn, damaged or uncommitted: open recommits them. */
  rewrite: number[];
  /** Errors make the store damaged (open refuses it); warnings are traces a crash leaves. */
  findings: Finding[];
}

interface Candidate {
  slot: number;
  header: MapSlotHeader;
  payload: Uint8Array | null;
}

/**
 * Reads every map page and chooses its version (docs/format.md, "Recovery"): the newest valid
 * slot whose commit the superblock records, or, when a newer commit proves complete, that
 * commit's. Hands each chosen payload to `load`, possibly twice for a page when rolling forward.
 * Never throws for damage: it is reported in `findings`.
 */
export async function readMap(
  store: BlockStore,
  sb: Superblock,
  load: (page: number, payload: Uint8Array) => void,
  /** Both superblock copies are valid ('same' from readSuperblocks): the digest's record is the newest. */
  superblocksIntact = false,
): Promise<RecoveredMap> {
  const { layout } = sb;
  const bs = layout.blockSize;
  const pageCount = metadataPages(layout);
  const recorded = sb.map?.commit ?? 0;
  const slot = new Uint8Array(pageCount);
  const sequence = new Float64Array(pageCount);
  const slotCommit = new Float64Array(pageCount);
  const chosen = new Uint8Array(pageCount);
  const pages: MapPageReport[] = [];
  // Slots of commits after the recorded one: few (one commit's pages), so their payloads are kept.
  const future = new Map<number, Candidate[]>();
  let maxCommit = recorded;
  for (let first = 0; first < pageCount; first += MAP_IO_PAGES) {
    const count = Math.min(MAP_IO_PAGES, pageCount - first);
    const chunk = new Uint8Array(2 * count * bs);
    await store.read(chunk, mapSlotOffset(layout, first, 0));
    for (let i = 0; i < count; i++) {
      const page = first + i;
      const report: MapPageReport = { page, slots: [] };
      let best: Candidate | null = null;
      for (let s = 0; s < 2; s++) {
        const image = chunk.subarray((2 * i + s) * bs, (2 * i + s + 1) * bs);
        const v = decodeMapSlot(layout, sb.uuid, page, image);
        if (!v.ok) {
          report.slots.push({ kind: v.kind, reason: v.reason });
          continue;
        }
        const h = v.header;
        maxCommit = Math.max(maxCommit, h.commit);
        if (h.commit > recorded) {
          report.slots.push({ kind: 'future', sequence: h.sequence, commit: h.commit });
          const list = future.get(page) ?? [];
          list.push({ slot: s, header: h, payload: image.slice(MAP_SLOT_HEADER) });
          future.set(page, list);
          continue;
        }
        report.slots.push({ kind: 'older', sequence: h.sequence, commit: h.commit });
        if (!best || h.sequence > best.header.sequence) best = { slot: s, header: h, payload: null };
      }
      if (best) {
        report.slots[best.slot].kind = 'current';
        chosen[page] = 1;
        slot[page] = best.slot;
        sequence[page] = best.header.sequence;
        slotCommit[page] = best.header.commit;
        load(page, chunk.subarray((2 * i + best.slot) * bs + MAP_SLOT_HEADER, (2 * i + best.slot + 1) * bs));
      }
      pages.push(report);
    }
  }

  let commit = recorded;
  let expected = sb.map?.digest ?? null;
  const adopted = rollForward(pageCount, chosen, sequence, slotCommit, future);
  if (adopted) {
    for (const [page, c] of adopted.pages) {
      const slots = pages[page].slots;
      if (chosen[page]) slots[slot[page]].kind = 'older';
      slots[c.slot].kind = 'current';
      chosen[page] = 1;
      slot[page] = c.slot;
      sequence[page] = c.header.sequence;
      slotCommit[page] = c.header.commit;
      load(page, c.payload!);
    }
    commit = adopted.commit;
    expected = adopted.digest;
  }

  const findings: Finding[] = [];
  const describe = (r: MapPageReport) => r.slots.map((s, k) => `slot ${k}: ${describeSlot(s, commit)}`).join('; ');
  const rewrite: number[] = [];
  const torn: number[] = [];
  const missing: number[] = [];
  for (const r of pages) {
    if (!chosen[r.page]) {
      missing.push(r.page);
      findings.push({ severity: 'error', message: `map page ${r.page} has no valid copy (${describe(r)})` });
      continue;
    }
    const other = r.slots[1 - slot[r.page]];
    if (other.kind === 'future') {
      rewrite.push(r.page);
      findings.push({ severity: 'warning', message: `map page ${r.page} holds a version that was never committed (${describe(r)}); the next open rewrites it` });
    } else if (other.kind === 'torn' || other.kind === 'damaged') {
      rewrite.push(r.page);
      torn.push(r.page);
    } else if (other.kind === 'unused' && sequence[r.page] > 1) {
      // Both slots were written (format writes slot 0, the first commit slot 1), and no crash
      // turns a written slot back into zeros: damage at rest. With both superblock copies
      // intact, the digest check below proves the blank slot did not hold the newest committed
      // version. Without them it may have: the damage that took a superblock copy (say, 8 KiB
      // zeroed over copy 1 and page 0's slot 0) can take the last commit's page and its record.
      rewrite.push(r.page);
      if (superblocksIntact) {
        findings.push({ severity: 'warning', message: `map page ${r.page} has a blank slot although both were written (${describe(r)}); the newest version is intact and the next open rewrites it` });
      } else {
        findings.push({
          severity: 'error',
          message: `map page ${r.page} has a blank slot although both were written (${describe(r)}), and a superblock copy is invalid too: the newest committed version of the page may be lost with it`,
        });
      }
    }
  }
  let digest = 0;
  for (let p = 0; p < pageCount; p++) if (chosen[p]) digest = (digest + mapDigestTerm(p, sequence[p], slotCommit[p])) >>> 0;
  if (missing.length === 0 && expected !== null && digest !== expected) {
    // A slot of a completed commit is gone (damaged, or a write the drive lost): the chosen
    // slots are an older map than the one committed. Pages where a slot this store wrote is
    // invalid are the likely ones (a sequence above 1 means both slots were written); failing
    // those, a zeroed slot looks never written, so pages with one are the candidates.
    const otherOf = (r: MapPageReport) => r.slots[1 - slot[r.page]];
    const suspects = pages.filter((r) => {
      const other = otherOf(r);
      return other.kind === 'torn' || other.kind === 'damaged' || (other.kind === 'unused' && sequence[r.page] > 1);
    });
    const candidates = suspects.length ? [] : pages.filter((r) => otherOf(r).kind === 'unused');
    const which = suspects.length
      ? suspects.map((r) => `map page ${r.page} looks damaged (${describe(r)})`).join('; ')
      : candidates.length > 0 && candidates.length <= 8
        ? candidates.map((r) => `map page ${r.page} may have lost its newest slot (${describe(r)})`).join('; ')
        : 'no page shows which';
    findings.push({
      severity: 'error',
      message: `the map is not the one the superblock records for map commit ${commit} (a slot of a completed commit was damaged or lost): ${which}`,
    });
  } else {
    for (const p of torn) findings.push({ severity: 'warning', message: `map page ${p} has one torn copy (${describe(pages[p])}); the newest valid copy is used` });
  }
  if (adopted) {
    findings.push({
      severity: 'warning',
      message: `map commit ${commit} is complete but the newest valid superblock copy records map commit ${recorded} (an interrupted commit, or a lost superblock write); the next open records it`,
    });
  }
  if (expected === null) {
    findings.push({
      severity: 'warning',
      message: `format version 1: the superblock records no map digest, so the map cannot be verified; the next open upgrades the store to version 2`,
    });
  }
  return {
    commit,
    digest,
    rolledForward: adopted !== null,
    nextCommit: maxCommit + 1,
    slot,
    sequence,
    slotCommit,
    rewrite,
    findings,
  };
}

/**
 * Roll-forward: the newest commit found in the slots wins over the superblock's record when its
 * map is complete: each page's newest valid slot up to that commit has the digest its slots
 * recorded. Then every page it wrote reached the disk, after its data was flushed; only its
 * superblock write is missing (a crash just before, or a damaged newest copy).
 */
function rollForward(
  pageCount: number,
  chosen: Uint8Array,
  sequence: Float64Array,
  slotCommit: Float64Array,
  future: Map<number, Candidate[]>,
): { commit: number; digest: number; pages: [number, Candidate][] } | null {
  let newest = -1;
  for (const list of future.values()) for (const c of list) newest = Math.max(newest, c.header.commit);
  if (newest < 0) return null;
  const claims = new Set<number>();
  for (const list of future.values()) for (const c of list) if (c.header.commit === newest) claims.add(c.header.mapDigest);
  if (claims.size !== 1) return null;
  const claim = [...claims][0];
  const pages: [number, Candidate][] = [];
  let digest = 0;
  for (let p = 0; p < pageCount; p++) {
    let pick: Candidate | null = null;
    for (const c of future.get(p) ?? []) if (!pick || c.header.sequence > pick.header.sequence) pick = c;
    if (pick && (!chosen[p] || pick.header.sequence > sequence[p])) {
      pages.push([p, pick]);
      digest = (digest + mapDigestTerm(p, pick.header.sequence, pick.header.commit)) >>> 0;
    } else if (chosen[p]) {
      digest = (digest + mapDigestTerm(p, sequence[p], slotCommit[p])) >>> 0;
    } else {
      return null;
    }
  }
  return digest === claim ? { commit: newest, digest, pages } : null;
}

function describeSlot(s: SlotReport, commit: number): string {
  switch (s.kind) {
    case 'current':
    case 'older':
      return `sequence ${s.sequence}`;
    case 'future':
      return `sequence ${s.sequence} of map commit ${s.commit}, after the committed ${commit}`;
    default:
      return s.reason;
  }
}
