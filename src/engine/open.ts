/**
 * Formatting a store and opening one: what is written to make a store, and what is read and
 * checked to recover one (format/recovery.ts decides which copies win), with the map journal a
 * daemon that died left behind. The Volume is built from what these return.
 */
import { CldError } from '../errors.js';
import type { BlockStore } from '../io/block-store.js';
import {
  computeLayout,
  encodeMapSlotInto,
  encodeSuperblock,
  FORMAT_VERSION,
  mapDigestTerm,
  type MapRecord,
  mapSlotOffset,
  metadataPages,
  newUuid,
  SUPERBLOCK_COPIES,
  type Superblock,
  superblockOffset,
} from '../format/format.js';
import type { Leftover } from '../format/map-journal.js';
import { MAP_IO_PAGES, type OtherCopy, readMap, readSuperblocks, type RecoveredMap } from '../format/recovery.js';
import { BlockMap } from './block-map.js';
import { ChangeTracking } from './change-tracking.js';
import type { PageSlots } from './commit.js';

export interface FormatOptions {
  blockSize?: number;
  /** The format version to write: 3 (default), or 2 (no changed-block tracking; tests of older stores). */
  version?: 2 | 3;
  name?: string;
  /** Clock for timestamps (ms since the Unix epoch). */
  now?: () => number;
}

export interface OpenOptions {
  now?: () => number;
  /**
   * The map journal's path (on tmpfs, see map-journal.ts): map changes are appended there before
   * their requests complete, so a daemon that dies is followed by one that knows them. A
   * function gets the store's uuid: a journal named after the store is found by whichever pair
   * name opens it next, so none is left behind to be replayed later over newer commits.
   */
  journalPath?: string | ((uuid: Uint8Array) => string);
}

/**
 * Formats `store`: the old signature is erased first, then the map, then both superblock
 * copies, so an interrupted format leaves no store that looks valid.
 */
export async function formatStore(store: BlockStore, options: FormatOptions = {}): Promise<{ sb: Superblock & { map: MapRecord }; pages: PageSlots }> {
  const blockSize = options.blockSize ?? 4096;
  const now = options.now ?? Date.now;
  const version = options.version ?? FORMAT_VERSION;
  const layout = computeLayout(store.size, blockSize, version);
  const pageCount = metadataPages(layout);
  const name = options.name ?? '';
  const uuid = newUuid();
  // Format is map commit 0: every page empty, sequence 1.
  let digest = 0;
  for (let p = 0; p < pageCount; p++) digest = (digest + mapDigestTerm(p, 1, 0)) >>> 0;
  const sb = {
    uuid,
    generation: 1,
    state: 'plain' as const,
    epoch: 0,
    stateChangedAt: now(),
    createdAt: now(),
    name,
    layout,
    map: { commit: 0, digest },
    version,
  };
  const sbImage = encodeSuperblock(sb); // validates the name before anything is written
  await store.zero(0, SUPERBLOCK_COPIES * blockSize);
  await store.flush();
  // Slot 0 of every page holds an empty page with sequence 1 (a tracking page: of period 0);
  // slot 1 is left invalid.
  for (let first = 0; first < pageCount; first += MAP_IO_PAGES) {
    const count = Math.min(MAP_IO_PAGES, pageCount - first);
    const chunk = new Uint8Array(2 * count * blockSize);
    for (let i = 0; i < count; i++) encodeMapSlotInto(chunk.subarray(2 * i * blockSize, (2 * i + 1) * blockSize), uuid, first + i, 1, null, 0, digest);
    await store.write(chunk, mapSlotOffset(layout, first, 0));
  }
  await store.flush();
  for (let copy = 0; copy < SUPERBLOCK_COPIES; copy++) await store.write(sbImage, superblockOffset(copy, blockSize));
  await store.flush();
  const pages = {
    slot: new Uint8Array(pageCount),
    sequence: new Float64Array(pageCount).fill(1),
    slotCommit: new Float64Array(pageCount),
    nextCommit: 1,
  };
  return { sb, pages };
}

/** A store as open found it: checked, with its map and tracking loaded. */
export interface RecoveredStore {
  /** The newest valid superblock copy, as read. */
  sb: Superblock;
  /** The same with the map commit open recovered (and a version 1 store upgraded to 2). */
  committed: Superblock & { map: MapRecord };
  /** Which copy `sb` is, and what the other one is. */
  copy: number;
  other: OtherCopy;
  map: BlockMap;
  tracking: ChangeTracking | null;
  recovered: RecoveredMap;
  /** Tracking pages as found, for open to rewrite (their period included). */
  trackingPayloads: Map<number, Uint8Array>;
}

/**
 * Reads a formatted store and recovers it (recovery.ts): the newest valid superblock copy and,
 * for every map page, the newest slot of a completed commit win. A foreign or damaged store (a
 * committed map slot that is gone included) is refused before anything is written.
 */
export async function recoverStore(store: BlockStore): Promise<RecoveredStore> {
  const found = await readSuperblocks(store);
  const { sb, copy, other } = found;
  const { layout } = sb;
  if (other === 'other-store') {
    throw new CldError('CLDD_CORRUPT', `${store.description}: the two superblock copies belong to different stores (uuids differ)`);
  }
  if (store.size < layout.storeSize) {
    throw new CldError(
      'CLDD_CORRUPT',
      `${store.description} has ${store.size} bytes but was formatted with ${layout.storeSize}: it was truncated`,
    );
  }
  const map = new BlockMap(layout.blocks, layout.blockSize);
  const tracking = ChangeTracking.forStore(layout, sb.epoch);
  // Tracking pages are rewritten as found (their period included) when open recommits them.
  const trackingPayloads = new Map<number, Uint8Array>();
  const recovered = await readMap(
    store,
    sb,
    (page, payload) => {
      if (!tracking?.isTrackingPage(page)) return map.load(page, payload);
      trackingPayloads.set(page, payload.slice());
      tracking.load(page, payload);
    },
    other === 'same',
  );
  const errors = recovered.findings.filter((f) => f.severity === 'error');
  if (errors.length) throw new CldError('CLDD_CORRUPT', `${store.description}: ${errors.map((f) => f.message).join('; ')}`);
  if (sb.state === 'plain' && map.count > 0) {
    throw new CldError('CLDD_CORRUPT', `${store.description}: the state is plain but ${map.count} blocks are marked redirected`);
  }
  // A version 1 store is upgraded to 2 (same layout), never to 3 (it has no tracking pages).
  const committed = { ...sb, map: { commit: recovered.commit, digest: recovered.digest }, version: Math.max(2, sb.version) };
  return { sb, committed, copy, other, map, tracking, recovered, trackingPayloads };
}

/**
 * Replays a dead process's map changes, refusing any the state cannot have made: a plain store
 * has no redirected blocks, a resync store gains none, a snapshot store loses none. Such a journal
 * belongs to another history of the store (a stale file); replaying it would serve the wrong
 * blocks and commit a map that contradicts the state. Refuses before anything is written.
 */
export function replayJournal(map: BlockMap, tracking: ChangeTracking | null, sb: Superblock, leftover: Leftover, path: string): void {
  const { state } = sb;
  // Records of another snapshot's period: the store was opened without this journal and moved on
  // (the state check below cannot tell one snapshot from the next).
  if (leftover.changes.length > 0 && leftover.epoch !== null && leftover.epoch !== sb.epoch) {
    throw new CldError(
      'CLDD_CORRUPT',
      `the map journal ${path} does not belong to this store's history: its ${leftover.changes.length} records are of snapshot ${leftover.epoch}'s period, but the store is at snapshot ${sb.epoch}; nothing was replayed or written`,
    );
  }
  leftover.changes.forEach((c, i) => {
    let wrong = false;
    map.forEachRun(c.start, c.end, (_s, _e, redirected) => {
      // Snapshot only sets bits; plain and resync only clear them.
      if (state === 'snapshot' ? redirected && !c.redirected : !redirected && c.redirected) wrong = true;
    });
    if (wrong) {
      const rule = { plain: 'a plain store has no redirected blocks', resync: 'a store in resync gains no redirected blocks', snapshot: 'a store in snapshot loses no redirected blocks' }[state];
      throw new CldError(
        'CLDD_CORRUPT',
        `the map journal ${path} does not belong to this store's history: record ${i + 1} ${c.redirected ? 'redirects' : 'unredirects'} blocks ${c.start}..${c.end - 1}, but ${rule}; nothing was replayed or written`,
      );
    }
    map.assign(c.start, c.end, c.redirected);
    // A redirect made in a snapshot carried its chunks' marks only in memory: they become durable
    // with it, in the commit open makes after the replay.
    if (c.redirected) tracking?.mark(c.start, c.end);
  });
}
