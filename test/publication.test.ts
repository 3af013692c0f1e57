/**
 * The publication the engine writes and the queue threads read (docs/serving.md): the native fast
 * path decides each kind of request as the rules say (test/wire.test.ts checks that both sides use
 * the same numbers). The model and interleaving tests run whole workloads through the same
 * decisions (support/fast-path.ts).
 */
import { describe, expect, test } from 'vitest';
import { Disk, serve } from './support/disk.js';
import { PUBLISHED_WORD } from '../src/engine/publication.js';
import { Volume } from '../src/engine/volume.js';
import { inOrder, type OrderedStep, packSteps, writtenBytes } from '../src/io/block-store.js';
import { MemoryStore } from '../src/io/memory-store.js';
import { COMMIT_STEP_KINDS } from '../src/native/wire.js';
import { addon } from '../src/native/addon.js';
import { nativePublication } from '../src/ublk/device.js';

const BS = 4096;
const READ = 0;
const WRITE = 1;
const FLUSH = 2;
const DISCARD = 3;
const FUA = 1 << 13;

describe('the fast path decides', () => {
  async function volume(): Promise<Volume> {
    return Volume.format(new MemoryStore(8 << 20), { blockSize: BS, name: 'publication' });
  }
  const plan = (v: Volume, target: 'master' | 'slave', opFlags: number, offset: number, length: number) => {
    const decided = addon().planFast(nativePublication(v), target, opFlags, offset, length);
    if (!decided) return null;
    const records = decided.extents;
    const out: { kind: number; offset: number; length: number; at: number }[] = [];
    for (let i = 0; i < records.length; i += 4) out.push({ kind: records[i], offset: records[i + 1], length: records[i + 2], at: records[i + 3] });
    // A write the engine must redirect after it ran; extents that run one after another.
    return decided.redirect ? { redirect: out } : decided.inOrder ? { inOrder: out } : out;
  };

  test('plain: reads and writes to the data area, flush as an fdatasync; the rest to the engine', async () => {
    const v = await volume();
    const { dataOffset } = v.layout;
    expect(plan(v, 'master', READ, 2 * BS, 2 * BS)).toEqual([{ kind: 0, offset: dataOffset + 2 * BS, length: 2 * BS, at: 0 }]);
    // The first write to a 64 KiB chunk in a tracking period is the engine's: it makes the
    // chunk's change mark durable first. Then the chunk's writes are the fast path's.
    expect(plan(v, 'master', WRITE, 3 * BS, BS)).toBeNull();
    await new Disk(v).write(0, new Uint8Array(BS));
    expect(plan(v, 'master', WRITE, 3 * BS, BS)).toEqual([{ kind: 1, offset: dataOffset + 3 * BS, length: BS, at: 0 }]);
    expect(plan(v, 'master', WRITE, 15 * BS, 2 * BS)).toBeNull(); // into the next chunk
    expect(plan(v, 'master', FLUSH, 0, 0)).toEqual([{ kind: 3, offset: 0, length: 0, at: 0 }]);
    // A FUA write with nothing to commit: the write, then an fdatasync, one after the other.
    expect(plan(v, 'master', WRITE | FUA, 0, BS)).toEqual({
      inOrder: [
        { kind: 1, offset: dataOffset, length: BS, at: 0 },
        { kind: 3, offset: 0, length: 0, at: 0 },
      ],
    });
    expect(plan(v, 'master', WRITE | FUA, 15 * BS, 2 * BS)).toBeNull(); // the next chunk has no mark
    expect(plan(v, 'master', DISCARD, 0, BS)).toBeNull();
    expect(plan(v, 'slave', READ, 0, BS)).toBeNull();
    // Malformed requests get the engine's error.
    expect(plan(v, 'master', READ, BS / 2, BS)).toBeNull();
    expect(plan(v, 'master', READ, 0, 0)).toBeNull();
    expect(plan(v, 'master', READ, v.layout.blocks * BS, BS)).toBeNull();
    await v.close();
  });

  test('snapshot: reads follow the bits run by run; only writes to redirected blocks; slave reads the data area', async () => {
    const v = await volume();
    await v.enable();
    await new Disk(v).write(0, new Uint8Array(16 * BS)); // marks chunk 0 and redirects blocks 0-15
    await new Disk(v).write(16 * BS, new Uint8Array(BS)); // marks chunk 1 and redirects block 16
    const { dataOffset, changeOffset } = v.layout;
    // Block 20 redirected, as a first touch leaves it (its chunk is marked already).
    const first = v.plan({ target: 'master', op: 'write', offset: 20 * BS, length: BS });
    expect(plan(v, 'master', WRITE, 20 * BS, BS)).toEqual({ redirect: [{ kind: 1, offset: changeOffset + 20 * BS, length: BS, at: 0 }] });
    (first as { finish(ok: boolean): void }).finish(true);
    // Its chunk's mark is in memory only, and rides with the redirect's commit: the bit is enough.
    expect(v.tracking!.durableBits[0] & 2).toBe(0);
    expect(plan(v, 'master', WRITE, 20 * BS, BS)).toEqual([{ kind: 1, offset: changeOffset + 20 * BS, length: BS, at: 0 }]);
    // A first touch: the change area too, and then the engine redirects the blocks.
    expect(plan(v, 'master', WRITE, 20 * BS, 2 * BS)).toEqual({ redirect: [{ kind: 1, offset: changeOffset + 20 * BS, length: 2 * BS, at: 0 }] });
    expect(plan(v, 'master', WRITE | FUA, 40 * BS, BS)).toBeNull();
    expect(plan(v, 'master', READ, 19 * BS, 3 * BS)).toEqual([
      { kind: 0, offset: dataOffset + 19 * BS, length: BS, at: 0 },
      { kind: 0, offset: changeOffset + 20 * BS, length: BS, at: BS },
      { kind: 0, offset: dataOffset + 21 * BS, length: BS, at: 2 * BS },
    ]);
    expect(plan(v, 'slave', READ, 20 * BS, BS)).toEqual([{ kind: 0, offset: dataOffset + 20 * BS, length: BS, at: 0 }]);
    expect(plan(v, 'slave', WRITE, 20 * BS, BS)).toBeNull();
    // The map change is not committed: a flush must commit it.
    expect(plan(v, 'master', FLUSH, 0, 0)).toBeNull();
    await v.commit();
    expect(plan(v, 'master', FLUSH, 0, 0)).toEqual([{ kind: 3, offset: 0, length: 0, at: 0 }]);
    // A FUA write to a redirected block with nothing to commit: the change area, then an
    // fdatasync, one after the other. A first touch stays the engine's (block 40 above).
    expect(plan(v, 'master', WRITE | FUA, 20 * BS, BS)).toEqual({
      inOrder: [
        { kind: 1, offset: changeOffset + 20 * BS, length: BS, at: 0 },
        { kind: 3, offset: 0, length: 0, at: 0 },
      ],
    });
    expect(plan(v, 'master', WRITE | FUA, 20 * BS, 2 * BS)).toBeNull();
    // Redirected, but not committed yet: the FUA write must wait for the commit of its bit.
    await new Disk(v).write(30 * BS, new Uint8Array(BS));
    expect(plan(v, 'master', WRITE | FUA, 30 * BS, BS)).toBeNull();
    await v.commit();
    expect(plan(v, 'master', WRITE | FUA, 30 * BS, BS)).not.toBeNull();
    await v.close();
  });

  test('snapshot, beside a redirector that may commit: a FUA write with something to commit is written, then committed on its thread', async () => {
    const v = await volume();
    const r = new (addon().Redirector)();
    const detach = v.attachRedirector(r);
    const decide = (offset: number, length: number) => {
      const d = addon().planFast(nativePublication(v, r), 'master', WRITE | FUA, offset, length);
      return d && { redirect: d.redirect, inOrder: d.inOrder, commit: d.commit, extents: [...d.extents] };
    };
    try {
      await v.enable();
      await new Disk(v).write(20 * BS, new Uint8Array(BS)); // marks chunk 1, redirects block 20
      await v.commit();
      const { changeOffset } = v.layout;
      // Nothing to commit: as without a redirector, the write and an fdatasync.
      expect(decide(20 * BS, BS)).toEqual({ redirect: false, inOrder: true, commit: false, extents: [1, changeOffset + 20 * BS, BS, 0, 3, 0, 0, 0] });
      // A first touch: its write, then its thread's redirect and commit.
      expect(decide(20 * BS, 2 * BS)).toEqual({ redirect: true, inOrder: false, commit: true, extents: [1, changeOffset + 20 * BS, 2 * BS, 0] });
      // Redirected by a thread, not committed yet: its write, then its thread's commit.
      expect(r.redirect(nativePublication(v, r), Float64Array.of(30, 31))).toBe(true);
      expect(decide(30 * BS, BS)).toEqual({ redirect: false, inOrder: false, commit: true, extents: [1, changeOffset + 30 * BS, BS, 0] });
      // The engine's own map change (a discard) waits for its own commit: the engine's, as before.
      await new Disk(v).discard(40 * BS, BS);
      expect(decide(30 * BS, BS)).toBeNull();
      expect(decide(50 * BS, BS)).toBeNull();
      await v.commit();
      expect(decide(50 * BS, BS)).toEqual({ redirect: true, inOrder: false, commit: true, extents: [1, changeOffset + 50 * BS, BS, 0] });
    } finally {
      detach();
      await v.close();
    }
  });

  test('resync: a FUA write to blocks not redirected, with nothing to commit, is a write in place and an fdatasync', async () => {
    const store = new HeldFlushes(8 << 20);
    const v = await Volume.format(store, { blockSize: BS });
    await new Disk(v).write(0, new Uint8Array(32 * BS)); // chunks 0 and 1 marked
    await v.enable();
    await new Disk(v).write(0, new Uint8Array(2 * BS)); // blocks 0 and 1 redirected
    await v.disable();
    await v.commit();
    expect(v.state).toBe('resync');
    const { dataOffset } = v.layout;
    expect(plan(v, 'master', WRITE | FUA, 5 * BS, BS)).toEqual({
      inOrder: [
        { kind: 1, offset: dataOffset + 5 * BS, length: BS, at: 0 },
        { kind: 3, offset: 0, length: 0, at: 0 },
      ],
    });
    // A redirected block is unredirected by the engine, under its range lock.
    expect(plan(v, 'master', WRITE | FUA, 1 * BS, BS)).toBeNull();
    // A chunk whose mark is not durable in the new period: the engine marks it first.
    expect(plan(v, 'master', WRITE | FUA, 40 * BS, BS)).toBeNull();
    // The merge clears the bits; until a commit has that, a FUA write there waits for it (a crash
    // would bring the committed bits back, and the write with them would read from the change area).
    const merge = (await v.beginMerge(1))!;
    await merge.finish(true);
    expect(v.map.test(0)).toBe(false);
    expect(v.state).toBe('resync');
    expect(plan(v, 'master', WRITE | FUA, 0, BS)).toBeNull();
    expect(plan(v, 'master', WRITE | FUA, 5 * BS, BS)).toBeNull(); // any: commitPending is up
    await v.commit();
    expect(plan(v, 'master', WRITE | FUA, 0, BS)).not.toBeNull();
    await v.close();
  });

  test("a FUA write in plain is the fast path's only while nothing waits to be committed", async () => {
    const store = new HeldFlushes(8 << 20);
    const v = await Volume.format(store, { blockSize: BS });
    await v.enable();
    await new Disk(v).write(0, new Uint8Array(BS)); // block 0 redirected, chunk 0 marked
    await v.disable();
    // The merge clears block 0's bit; until a commit has it, a FUA write to block 0 in the data
    // area would be lost to a crash (the committed map still sends reads to the change area).
    const merge = (await v.beginMerge(16))!;
    await merge.finish(true);
    expect(v.state).toBe('plain');
    expect(plan(v, 'master', WRITE | FUA, 0, BS)).toBeNull();
    await v.commit();
    expect(plan(v, 'master', WRITE | FUA, 0, BS)).not.toBeNull();
    await v.close();
  });

  test('a fast first touch in a snapshot: the engine marks its chunk and redirects its blocks, or fails it', async () => {
    const v = await volume();
    await v.enable();
    const { changeOffset } = v.layout;
    const decided = () => plan(v, 'master', WRITE, 40 * BS, 2 * BS);
    expect(decided()).toEqual({ redirect: [{ kind: 1, offset: changeOffset + 40 * BS, length: 2 * BS, at: 0 }] });
    await v.commit();
    expect(plan(v, 'master', FLUSH, 0, 0)).not.toBeNull();
    // A failed write redirects nothing.
    v.finishFastRedirect(40 * BS, 2 * BS, false);
    expect(v.map.test(40)).toBe(false);
    expect(v.status().counters.errors).toBe(1);
    v.finishFastRedirect(40 * BS, 2 * BS, true);
    expect([v.map.test(40), v.map.test(41), v.map.test(42)]).toEqual([true, true, false]);
    expect(v.tracking!.changedBytes).toBe(64 << 10); // chunk 2, in memory until the commit
    expect(v.tracking!.durableBits[0] & 4).toBe(0);
    // A flush now has the redirect to commit.
    expect(plan(v, 'master', FLUSH, 0, 0)).toBeNull();
    await v.commit();
    expect(v.tracking!.durableBits[0] & 4).toBe(4);
    expect(plan(v, 'master', WRITE, 40 * BS, 2 * BS)).toEqual([{ kind: 1, offset: changeOffset + 40 * BS, length: 2 * BS, at: 0 }]);
    // Outside a snapshot, or on a closed volume, it cannot become part of the master.
    await v.disable();
    expect(() => v.finishFastRedirect(50 * BS, BS, true)).toThrow(/cannot be redirected in state resync/);
    await v.close();
    expect(() => v.finishFastRedirect(50 * BS, BS, true)).toThrow(expect.objectContaining({ code: 'CLDD_CLOSED' }));
  });

  /** A store whose flushes wait until the test lets them go: a commit stays running meanwhile. */
  class HeldFlushes extends MemoryStore {
    held: (() => void)[] = [];
    hold = false;
    override async flush(): Promise<void> {
      if (this.hold) await new Promise<void>((resolve) => this.held.push(resolve));
    }
  }
  const turns = async () => {
    for (let i = 0; i < 20; i++) await new Promise((r) => setImmediate(r));
  };

  test("a flush during a commit that writes map pages is the engine's, whatever else happens meanwhile", async () => {
    const store = new HeldFlushes(8 << 20);
    const v = await Volume.format(store, { blockSize: BS });
    await v.enable();
    await new Disk(v).write(0, new Uint8Array(BS).fill(1)); // a first touch: a dirty page
    store.hold = true;
    const committing = v.commit(); // takes the page, then waits in its first fdatasync
    await turns();
    expect(v.map.dirtyPages).toBe(0);
    // A first touch whose write fails publishes the flag again on its way out.
    const failing = { run: async () => Promise.reject(new Error('EIO')) };
    await serve(v, failing, { target: 'master', op: 'write', offset: 8 * BS, length: BS }, new Uint8Array(BS)).catch(() => {});
    expect(plan(v, 'master', FLUSH, 0, 0), 'a fast flush would return before the page is durable').toBeNull();
    store.hold = false;
    while (store.held.length) store.held.shift()!();
    await committing;
    expect(plan(v, 'master', FLUSH, 0, 0)).not.toBeNull();
    await v.close();
  });

  test('flushes stay fast while commits that write no map run back to back (FUA writes)', async () => {
    const store = new HeldFlushes(8 << 20);
    const v = await Volume.format(store, { blockSize: BS });
    const d = new Disk(v);
    await d.write(0, new Uint8Array(BS)); // chunk 0 gets its durable mark
    store.hold = true;
    // Each FUA write's commit is an fdatasync; the next FUA write arrives while it runs.
    const writes: Promise<void>[] = [];
    for (let i = 0; i < 20; i++) {
      writes.push(d.write(0, new Uint8Array(BS).fill(i), { fua: true }));
      await turns();
      expect(plan(v, 'master', FLUSH, 0, 0), `flush during FUA write ${i}'s commit`).not.toBeNull();
      store.held.shift()?.();
    }
    store.hold = false;
    while (store.held.length) store.held.shift()!();
    await Promise.all(writes);
    await v.close();
  });

  test('resync: writes only to blocks not redirected; off while a state change runs, and after close', async () => {
    const v = await volume();
    await v.enable();
    await new Disk(v).write(5 * BS, new Uint8Array(BS)); // redirects block 5, marks chunk 0
    await v.disable();
    expect(v.state).toBe('resync');
    expect(plan(v, 'master', WRITE, 5 * BS, BS)).toBeNull();
    expect(plan(v, 'master', WRITE, 6 * BS, BS)).not.toBeNull();
    // A write in place to a chunk with no durable mark (chunk 1) is the engine's, as in plain.
    expect(plan(v, 'master', WRITE, 17 * BS, BS)).toBeNull();
    expect(plan(v, 'slave', READ, 0, BS)).toBeNull();
    // A state change turns the path off before it drains, and on again after.
    let resolveIdle!: () => void;
    let drained = false;
    const detach = v.attachFastPath({
      idle: () => new Promise<void>((resolve) => (resolveIdle = () => ((drained = true), resolve()))),
      counters: () => ({ reads: 1, writes: 2, flushes: 3, bytesRead: 4, bytesWritten: 5, errors: 0, pollsCaught: 0, pollsRanOut: 0 }),
      describeRequests: () => '',
    });
    expect(v.status().counters.flushes).toBe(3);
    const merge = await v.beginMerge(64);
    await merge!.finish(true);
    const enabling = v.enable({ wait: true });
    await new Promise((r) => setImmediate(r));
    expect(plan(v, 'master', READ, 0, BS)).toBeNull();
    resolveIdle();
    await enabling;
    expect(drained).toBe(true);
    expect(plan(v, 'master', READ, 0, BS)).not.toBeNull();
    detach();
    expect(v.status().counters.flushes).toBe(3);
    await v.close();
    expect(plan(v, 'master', READ, 0, BS)).toBeNull();
  });
});

describe("a flush's own sync (docs/serving.md)", () => {
  const words = (v: Volume) => nativePublication(v).words;
  const mapChanges = (v: Volume) => Atomics.load(words(v), PUBLISHED_WORD.mapChanges) >>> 0;
  /** A runner that records the steps and runs them on the store, as a queue thread would. */
  const recorder = (v: Volume, seen: OrderedStep[][]) => (steps: readonly OrderedStep[]) => {
    seen.push([...steps]);
    return inOrder(v.store, steps);
  };
  const records = (steps: readonly OrderedStep[]) => {
    const r = new Float64Array(4 * steps.length);
    packSteps(steps, COMMIT_STEP_KINDS, r, 0, new Uint8Array(writtenBytes(steps)));
    return r;
  };

  test('every map change is counted, the engine\'s and a queue thread\'s', async () => {
    const v = await Volume.format(new MemoryStore(8 << 20), { blockSize: BS, name: 'own-sync' });
    const redirector = new (addon().Redirector)();
    const detach = v.attachRedirector(redirector);
    await v.enable();
    const before = mapChanges(v);
    await new Disk(v).write(0, new Uint8Array(BS)); // the engine redirects block 0
    expect(mapChanges(v)).toBe(before + 1);
    // A first touch a thread wrote and redirects itself (its chunk marked already).
    expect(redirector.redirect(nativePublication(v, redirector), Float64Array.of(3, 5))).toBe(true);
    expect(mapChanges(v)).toBe(before + 2);
    await new Disk(v).flush(); // nothing counted: no map change
    expect(mapChanges(v)).toBe(before + 2);
    detach();
    await v.close();
  });

  test('a flush alone makes its commit\'s first fdatasync skippable at the count its capture saw', async () => {
    const v = await Volume.format(new MemoryStore(8 << 20), { blockSize: BS, name: 'own-sync' });
    await v.enable();
    await new Disk(v).write(0, new Uint8Array(BS));
    // A thread's own sync begins here; a first touch completes after it, before the capture.
    const own = mapChanges(v);
    await new Disk(v).write(40 * BS, new Uint8Array(BS));
    const seen: OrderedStep[][] = [];
    await v.commit(recorder(v, seen));
    expect(seen).toHaveLength(1);
    const steps = seen[0];
    expect(steps[0]).toEqual({ kind: 'flush', skippableAt: own + 1 });
    const r = records(steps);
    // Not covered: the change after it began may have data that sync missed.
    expect(addon().ownSyncCovers(true, own, r, 0)).toBe(false);
    // Covered by a sync that began at the capture's count, and only if it succeeded.
    expect(addon().ownSyncCovers(true, own + 1, r, 0)).toBe(true);
    expect(addon().ownSyncCovers(false, own + 1, r, 0)).toBe(false);
    // Never the page writes or the flushes after them.
    for (let i = 1; i < steps.length; i++) expect(addon().ownSyncCovers(true, own + 1, r, 4 * i)).toBe(false);
    expect(steps.slice(1).some((s) => s.kind === 'flush' && s.skippableAt !== undefined)).toBe(false);
    await v.close();
  });

  test('a commit serving several flushes always flushes first', async () => {
    const v = await Volume.format(new MemoryStore(8 << 20), { blockSize: BS, name: 'own-sync' });
    await v.enable();
    await new Disk(v).write(0, new Uint8Array(BS));
    // A commit runs; two flushes arrive meanwhile and share the next one.
    let release!: () => void;
    const held = new Promise<void>((resolve) => (release = resolve));
    const first = v.commit((steps) => held.then(() => inOrder(v.store, steps)));
    await new Disk(v).write(40 * BS, new Uint8Array(BS));
    const seen: OrderedStep[][] = [];
    const both = [v.commit(recorder(v, seen)), v.commit(recorder(v, seen))];
    release();
    await Promise.all([first, ...both]);
    expect(seen).toHaveLength(1);
    expect(seen[0][0]).toEqual({ kind: 'flush' });
    await v.close();
  });
});
