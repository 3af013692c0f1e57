/**
 * Changed-block tracking in the engine: which chunks each period holds, that a chunk's first
 * write in place waits for its durable mark and later ones do not, that a snapshot's writes wait
 * for nothing and their marks ride with their redirects, what reopening keeps, older stores,
 * damage, and the memory bound. Crashes are in crash-points.test.ts and crash-model.test.ts.
 */
import { describe, expect, test, vi } from 'vitest';
import { check } from '../src/engine/check.js';
import { ChangeTracking } from '../src/engine/change-tracking.js';
import { Disk, StoreExecutor } from './support/disk.js';
import { computeLayout, encodeMapSlot, encodeTrackingPayload, mapSlotOffset, trackingPage } from '../src/format/format.js';
import { ResyncScheduler } from '../src/engine/resync.js';
import { Volume } from '../src/engine/volume.js';
import { MemoryStore } from '../src/io/memory-store.js';
import { commitPage } from './support/forge.js';

const MiB = 1 << 20;
const BS = 4096;
const CHUNK = 65536;
const block = (v: number) => new Uint8Array(BS).fill(v);

async function fresh(version?: 2 | 3): Promise<{ store: MemoryStore; volume: Volume; disk: Disk }> {
  const store = new MemoryStore(16 * MiB);
  const volume = await Volume.format(store, { blockSize: BS, version });
  return { store, volume, disk: new Disk(volume) };
}

describe('changed-block tracking', () => {
  test('writes in every state land in the set of their period, and a snapshot makes it the delta', async () => {
    const { store, volume, disk } = await fresh();
    const t = volume.tracking!;
    await disk.write(0, block(1)); // chunk 0, period 0
    await volume.enable(); // snapshot 1
    expect(t.deltaExtents()).toEqual([[0, CHUNK]]);
    expect(t.changedExtents()).toEqual([]);
    await disk.write(17 * BS, block(2)); // snapshot: chunk 1
    await volume.disable();
    await disk.write(3 * CHUNK, block(3)); // resync (block 48 was never redirected): chunk 3
    await new ResyncScheduler(volume, new StoreExecutor(store), { yieldMs: 0 }).start();
    await disk.write(4 * CHUNK - BS, new Uint8Array(2 * BS)); // plain, across chunks 3 and 4
    await disk.discard(10 * CHUNK, 2 * CHUNK); // discards change the master too: chunks 10, 11
    expect(t.since).toBe(1);
    expect(t.changedExtents()).toEqual([
      [CHUNK, CHUNK],
      [3 * CHUNK, 2 * CHUNK],
      [10 * CHUNK, 2 * CHUNK],
    ]);
    expect(volume.status().tracking).toMatchObject({ since: 1, changedBytes: 5 * CHUNK, deltaBytes: CHUNK, chunkSize: CHUNK });
    await volume.enable(); // snapshot 2: the set becomes the delta 1 -> 2
    expect(t.changesSince(1)).toEqual([
      [CHUNK, CHUNK],
      [3 * CHUNK, 2 * CHUNK],
      [10 * CHUNK, 2 * CHUNK],
    ]);
    expect(t.changesSince(2)).toEqual([]);
    expect(t.changesSince(0), 'only the last delta is kept').toBeNull();
    await volume.close();
  });

  test('the last chunk counts only up to the end of the master', async () => {
    const store = new MemoryStore(4 * MiB + 8 * BS);
    const volume = await Volume.format(store, { blockSize: BS });
    const capacity = volume.capacity;
    const tail = capacity % CHUNK;
    expect(tail, 'the last chunk is short').toBeGreaterThan(0);
    await new Disk(volume).write(capacity - BS, block(1));
    expect(volume.tracking!.changedExtents()).toEqual([[capacity - tail, tail]]);
    expect(volume.status().tracking!.changedBytes).toBe(tail);
    await volume.close();
  });

  test('a chunk is marked durably before its first write is issued, and only once a period', async () => {
    const { store, volume } = await fresh();
    const t = volume.tracking!;
    const commits = volume.counters.commits;
    const planned = volume.plan({ target: 'master', op: 'write', offset: 5 * BS, length: BS });
    expect(planned, 'the first write to a chunk waits for its mark').toBeInstanceOf(Promise);
    expect(t.durableBits[0] & 1, 'not durable before the commit').toBe(0);
    const plan = await planned;
    expect(volume.counters.commits).toBe(commits + 1);
    expect(t.durableBits[0] & 1).toBe(1);
    // The mark is on disk: a volume opened from a copy of the store right now sees it.
    const copy = await Volume.open(MemoryStore.copyOf(store));
    expect(copy.tracking!.changedExtents()).toEqual([[0, CHUNK]]);
    plan.finish(true);
    // The next write to the same chunk is planned at once, with no commit.
    const again = volume.plan({ target: 'master', op: 'write', offset: 6 * BS, length: BS });
    expect(again).not.toBeInstanceOf(Promise);
    (again as Exclude<typeof again, Promise<unknown>>).finish(true);
    expect(volume.counters.commits).toBe(commits + 1);
    await volume.close();
  });

  test("a mark's commit skips the data flush: marks order nothing after data", async () => {
    const { store, volume, disk } = await fresh();
    await disk.write(0, block(1)); // chunk 0 marked
    const flush = vi.spyOn(store, 'flush');
    const writes = vi.spyOn(store, 'write');
    await disk.write(CHUNK, block(2)); // chunk 1: a commit for its mark only
    // Its tracking page, a flush, one superblock copy, a flush; then the write itself.
    expect(flush).toHaveBeenCalledTimes(2);
    expect(writes).toHaveBeenCalledTimes(3);
    flush.mockClear();
    await disk.flush(); // a flush request's commit (nothing to write) flushes the data
    expect(flush).toHaveBeenCalledTimes(1);
    // The mark is durable: a copy of the store sees both chunks.
    expect((await Volume.open(MemoryStore.copyOf(store))).tracking!.changedExtents()).toEqual([[0, 2 * CHUNK]]);
    await volume.close();
  });

  test('a write in a snapshot waits for no commit: the commit that makes its redirect durable writes its mark', async () => {
    const { store, volume, disk } = await fresh();
    await volume.enable();
    const t = volume.tracking!;
    const commits = volume.counters.commits;
    const planned = volume.plan({ target: 'master', op: 'write', offset: 20 * BS, length: BS }); // chunk 1
    expect(planned, 'a first touch after enable is planned at once').not.toBeInstanceOf(Promise);
    expect(t.changedExtents(), 'marked in memory before the write is issued').toEqual([[CHUNK, CHUNK]]);
    expect(t.durableBits[0] & 2).toBe(0);
    (planned as Exclude<typeof planned, Promise<unknown>>).finish(true);
    expect(volume.counters.commits).toBe(commits);
    // Before the flush neither the redirect nor the mark is on disk: the write is not part of the master.
    const before = await Volume.open(MemoryStore.copyOf(store));
    expect(before.map.count).toBe(0);
    expect(before.tracking!.changedExtents()).toEqual([]);
    await disk.flush();
    expect(t.durableBits[0] & 2).toBe(2);
    const after = await Volume.open(MemoryStore.copyOf(store));
    expect(after.map.count).toBe(1);
    expect(after.tracking!.changedExtents()).toEqual([[CHUNK, CHUNK]]);
    await volume.close();
  });

  test('writes to many new chunks at once share one commit', async () => {
    const { volume } = await fresh();
    const commits = volume.counters.commits;
    const plans = [0, 1, 2, 3, 4, 5, 6, 7].map((c) => volume.plan({ target: 'master', op: 'write', offset: c * CHUNK, length: BS }));
    for (const p of await Promise.all(plans)) p.finish(true);
    expect(volume.counters.commits).toBe(commits + 1);
    expect(volume.tracking!.changedExtents()).toEqual([[0, 8 * CHUNK]]);
    await volume.close();
  });

  test('reopening keeps both sets, through a resync', async () => {
    const { store, volume, disk } = await fresh();
    await disk.write(2 * CHUNK, block(1));
    await volume.enable();
    await disk.write(7 * CHUNK, block(2));
    await volume.disable();
    await volume.close();
    const reopened = await Volume.open(store);
    expect(reopened.state).toBe('resync');
    expect(reopened.tracking!.since).toBe(1);
    expect(reopened.tracking!.changedExtents()).toEqual([[7 * CHUNK, CHUNK]]);
    expect(reopened.tracking!.deltaExtents()).toEqual([[2 * CHUNK, CHUNK]]);
    expect((await check(store)).tracking).toEqual({ since: 1, changedBytes: CHUNK, deltaBytes: CHUNK });
    await reopened.close();
  });

  test('a store of format version 2 has no tracking and keeps working', async () => {
    const { store, volume, disk } = await fresh(2);
    expect(volume.tracking).toBeNull();
    expect(volume.status().tracking).toBeNull();
    await disk.write(0, block(1));
    await volume.enable();
    await volume.close();
    const reopened = await Volume.open(store);
    expect(reopened.superblock.version).toBe(2);
    expect(reopened.tracking).toBeNull();
    expect((await check(store)).tracking).toBeNull();
    await reopened.close();
  });

  test('a tracking page of a later period than the store is damage: check says so and open refuses', async () => {
    const { store, volume, disk } = await fresh();
    await disk.write(0, block(1));
    await volume.close();
    const { layout } = volume;
    // A page of snapshot 4's period in set 0, committed as a commit would (the digest matches).
    const bits = new Uint32Array(layout.trackingBitsPerPage / 32);
    bits[0] = 1;
    await commitPage(store, trackingPage(layout, 0, 0), encodeTrackingPayload(layout, 4, bits));
    const report = await check(store);
    expect(report.clean).toBe(false);
    expect(report.findings.map((f) => f.message).join('\n')).toMatch(/of snapshot 4's period, after the store's snapshot 0/);
    await expect(Volume.open(store)).rejects.toMatchObject({ code: 'CLDD_CORRUPT' });
  });

  test('marks past the last chunk are damage', async () => {
    const { store, volume } = await fresh();
    await volume.close();
    const { layout } = volume;
    const bits = new Uint32Array(layout.trackingBitsPerPage / 32);
    bits[layout.chunks >>> 5] |= 1 << (layout.chunks & 31);
    await commitPage(store, trackingPage(layout, 0, 0), encodeTrackingPayload(layout, 0, bits));
    expect((await check(store)).findings.map((f) => f.message).join('\n')).toMatch(/past the last chunk/);
    await expect(Volume.open(store)).rejects.toMatchObject({ code: 'CLDD_CORRUPT' });
  });

  test('a torn tracking slot of an uncommitted write is a warning, and open rewrites it', async () => {
    const { store, volume, disk } = await fresh();
    await disk.write(0, block(1));
    await volume.close();
    const { layout } = volume;
    const page = trackingPage(layout, 0, 0);
    // Slot 1 holds the committed mark (format wrote slot 0); tear slot 0 as a crash would.
    const torn = encodeMapSlot(layout, volume.superblock.uuid, page, 9, null);
    torn[100] ^= 1;
    store.writeSync(torn, mapSlotOffset(layout, page, 0));
    const report = await check(store);
    expect(report.clean).toBe(true);
    expect(report.findings.map((f) => f.message)).toEqual([expect.stringMatching(new RegExp(`map page ${page} has one torn copy`))]);
    const reopened = await Volume.open(store);
    expect(reopened.tracking!.changedExtents()).toEqual([[0, CHUNK]]);
    await reopened.close();
    expect((await check(store)).findings).toEqual([]);
    expect((await Volume.open(store)).tracking!.changedExtents()).toEqual([[0, CHUNK]]);
  });

  test('the sets cost at most 8 MiB of memory per TiB of master', () => {
    const TiB = 2 ** 40;
    const layout = computeLayout(2 * TiB + 64 * MiB, BS);
    const t = ChangeTracking.forStore(layout, 1)!;
    const perTiB = t.residentBytes / ((layout.blocks * BS) / TiB);
    console.log(`tracking memory: ${(perTiB / MiB).toFixed(2)} MiB per TiB of master (3 bitmaps of 64 KiB chunks)`);
    expect(perTiB).toBeLessThanOrEqual(8 * MiB);
    // The tracking pages in the map area: two sets, two slots per page.
    expect(layout.trackingPages * 2 * 2 * BS).toBeLessThan(9 * MiB);
  });
});
