/**
 * A map commit built by a master flush's queue thread (native/redirector.cc, CaptureCommit and
 * CommitDone; docs/serving.md, "A flush's commit on its queue thread"), driven as a thread drives
 * it through test/support/fast-path.ts: it must write exactly the bytes the engine's commit of the
 * same redirects writes, and leave every flush to the engine whenever the engine has anything of
 * its own to commit. The crash model and the interleavings test run it under power loss and in
 * random orders; this checks the bytes and each case where it must decline.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, test } from 'vitest';
import { within } from '../src/deadline.js';
import { COMPACT_BYTES, RECORD } from '../src/format/map-journal.js';
import { PUBLISHED_WORD } from '../src/engine/publication.js';
import { Volume } from '../src/engine/volume.js';
import { MemoryStore } from '../src/io/memory-store.js';
import type { NativeRedirector } from '../src/native/native.js';
import { COMMIT_STATE } from '../src/engine/commit.js';
import { nativePublication } from '../src/ublk/device.js';
import { Disk, serve, StoreExecutor } from './support/disk.js';
import { FastPath, FastPathDisk } from './support/fast-path.js';
import { between, rng, seedFromEnv } from './support/random.js';

const BS = 4096;
const SIZE = 600 << 20;
const now = () => 1_750_000_000_000;

function copyOf(store: MemoryStore): MemoryStore {
  const copy = new MemoryStore(store.size);
  const chunk = new Uint8Array(1 << 20);
  for (let at = 0; at < store.size; at += chunk.length) {
    store.readSync(chunk, at);
    copy.writeSync(chunk, at);
  }
  return copy;
}

function bytesOf(store: MemoryStore, offset: number, length: number): Uint8Array {
  const out = new Uint8Array(length);
  store.readSync(out, offset);
  return out;
}

async function formatted(version: 2 | 3): Promise<MemoryStore> {
  const store = new MemoryStore(SIZE);
  await (await Volume.format(store, { blockSize: BS, name: 'native', version, now })).close();
  return store;
}

describe('a queue thread\'s map commit', () => {
  for (const version of [3, 2] as const) {
    test(`writes what the engine's commit of the same first touches writes (format version ${version})`, async () => {
      const seed = seedFromEnv();
      console.log(`native commit bytes seed: ${seed} (replay with CLDD_SEED=${seed})`);
      const random = rng(seed);
      const a = await formatted(version);
      const b = copyOf(a);
      const here = await Volume.open(a, { now });
      const engine = await Volume.open(b, { now });
      const diskA = new FastPathDisk(here, a);
      const diskB = new FastPathDisk(engine, b, undefined, true, false);
      try {
        await here.enable();
        await engine.enable();
        const { blocks, bitsPerPage, dataOffset } = here.layout;
        for (let round = 0; round < 40; round++) {
          for (let k = between(random, 1, 6); k > 0; k--) {
            // Near a map page's end a third of the time: a write across two pages.
            const n = between(random, 1, 16);
            const start = random() < 0.33 ? Math.min(blocks - n, between(random, 1, Math.floor(blocks / bitsPerPage)) * bitsPerPage - between(random, 1, n)) : between(random, 0, blocks - n);
            const data = new Uint8Array(n * BS).fill(round + 1);
            await diskA.write(start * BS, data);
            await diskB.write(start * BS, data);
          }
          await diskA.flush();
          await diskB.flush();
          expect(Buffer.compare(bytesOf(a, 0, dataOffset), bytesOf(b, 0, dataOffset)), `the metadata after round ${round}`).toBe(0);
        }
        expect(diskA.fast.commitsHere, 'commits the thread built').toBeGreaterThan(30);
        expect(diskB.fast.commitsHere).toBe(0);
        // The engine took every commit the thread made into its own bookkeeping.
        here.takeRedirects();
        expect(here.status().counters.commits).toBe(engine.status().counters.commits);
        expect(here.status().counters.queueCommits).toBe(diskA.fast.commitsHere);
        expect(engine.status().counters.queueCommits).toBe(0);
        await here.disable();
        await engine.disable();
        expect(Buffer.compare(bytesOf(a, 0, dataOffset), bytesOf(b, 0, dataOffset)), 'the metadata after disable').toBe(0);
      } finally {
        diskA.fast.close();
        diskB.fast.close();
        await here.close();
        await engine.close();
      }
    });
  }

  test('leaves every flush to the engine while the engine has anything of its own to commit', async () => {
    const store = await formatted(3);
    const volume = await Volume.open(store, { now });
    const disk = new FastPathDisk(volume, store);
    try {
      const { words } = volume.publication;
      const one = new Uint8Array(BS).fill(7);
      // Plain: the threads redirect nothing, and a flush with something to commit is the engine's.
      await disk.write(0, one);
      await disk.flush();
      expect(disk.fast.commitsHere).toBe(0);
      await volume.enable();
      // A first touch the thread redirected, nothing else: its flush commits on the thread.
      await disk.write(10 * BS, one);
      expect(Atomics.load(words, PUBLISHED_WORD.commitPending)).toBe(1);
      await disk.flush();
      expect(disk.fast.commitsHere).toBe(1);
      expect(Atomics.load(words, PUBLISHED_WORD.commitPending), 'nothing left to commit').toBe(0);
      // A discard in a snapshot is the engine's map change: the next flush is the engine's too.
      await disk.write(20 * BS, one);
      await disk.discard(30 * BS, BS);
      await disk.flush();
      expect(disk.fast.commitsHere).toBe(1);
      // Its commit done, the thread commits again.
      await disk.write(40 * BS, one);
      await disk.flush();
      expect(disk.fast.commitsHere).toBe(2);
      // A second capture while one runs declines; so does one with nothing of the threads'.
      await disk.write(50 * BS, one);
      const r = (disk.fast as unknown as { redirector: NativeRedirector }).redirector;
      const pub = nativePublication(volume, r);
      const meta = new Uint8Array(64 * 1024);
      const steps = r.captureCommit(pub, meta);
      expect(steps).not.toBeNull();
      expect(Atomics.load(words, PUBLISHED_WORD.nativeCommit)).toBe(1);
      expect(r.captureCommit(pub, new Uint8Array(64 * 1024))).toBeNull();
      // A commit of the engine's waits for it to end, and is woken when it does.
      let engineDone = false;
      const engineCommit = volume.commit().then(() => (engineDone = true));
      await new Promise((resolve) => setImmediate(resolve));
      expect(engineDone).toBe(false);
      expect(Atomics.load(words, PUBLISHED_WORD.nativeCommit), 'the engine waits').toBe(2);
      // The steps as a thread would run them.
      for (let i = 0; i < steps!.length; i += 4) {
        if (steps![i] === 4) await store.write(meta.subarray(steps![i + 3], steps![i + 3] + steps![i + 2]), steps![i + 1]);
        else await store.flush();
      }
      expect(r.commitDone(pub, 0), 'the engine waits to be woken').toBe(true);
      volume.takeRedirects();
      await engineCommit;
      expect((volume as unknown as { writer: { state: Float64Array } }).writer.state[COMMIT_STATE.done]).toBe(3);
      // A failed one: no thread commits again, and the volume fails at its next hold.
      await disk.write(60 * BS, one);
      const failing = r.captureCommit(pub, meta);
      expect(failing).not.toBeNull();
      expect(r.commitDone(pub, 5)).toBe(false);
      await disk.write(70 * BS, one);
      expect(r.captureCommit(pub, meta)).toBeNull();
      await expect(disk.flush()).rejects.toMatchObject({ code: 'EIO' });
      await expect(volume.commit()).rejects.toMatchObject({ code: 'EIO' });
    } finally {
      disk.fast.close();
      await volume.close().catch(() => {});
    }
  });

  test('commits a FUA write in a snapshot on its thread, or hands the whole write to the engine', async () => {
    const store = await formatted(3);
    const volume = await Volume.open(store, { now });
    // The next FUA write the fast path serves waits here before its write, while `held` is set.
    let held: ((go: () => void) => void) | null = null;
    const fast = new FastPath(volume, store, (what) =>
      held && what.startsWith('fast FUA write') ? new Promise<void>((go) => (held!(go), (held = null))) : Promise.resolve(),
    );
    const executor = new StoreExecutor(store);
    const write = async (block: number, fill: number, fua: boolean): Promise<void> => {
      const data = new Uint8Array(BS).fill(fill);
      const req = { target: 'master' as const, op: 'write' as const, offset: block * BS, length: BS, fua };
      const served = fast.tryServe(req, data);
      if (served && (await served) === 'done') return;
      await serve(volume, executor, req, data);
    };
    // What the master holds after a power loss now: a copy of the store, opened (no journal).
    const afterPowerLoss = async (block: number): Promise<number> => {
      const copy = await Volume.open(copyOf(store), { now });
      try {
        return (await new Disk(copy).read(block * BS, BS))[0];
      } finally {
        await copy.close();
      }
    };
    const { words } = volume.publication;
    try {
      await volume.enable();
      // A first touch with FUA: written, redirected and committed by its thread.
      await write(10, 1, true);
      expect(fast.fuaCommitsHere).toBe(1);
      expect(fast.redirectedHere).toBe(1);
      expect(Atomics.load(words, PUBLISHED_WORD.commitPending), 'nothing left to commit').toBe(0);
      expect(await afterPowerLoss(10)).toBe(1);
      // Rewritten with nothing to commit: the write and an fdatasync, no commit.
      await write(10, 2, true);
      expect(fast.fuaCommitsHere).toBe(1);
      expect(await afterPowerLoss(10)).toBe(2);
      // Behind a first touch without FUA (lost at a power loss until a commit holds it), a FUA
      // write to redirected blocks commits it.
      await write(20, 3, false);
      expect(Atomics.load(words, PUBLISHED_WORD.commitPending)).toBe(1);
      expect(await afterPowerLoss(20), 'a redirect no commit holds').toBe(0);
      await write(10, 4, true);
      expect(fast.fuaCommitsHere).toBe(2);
      expect(await afterPowerLoss(20)).toBe(3);
      expect(await afterPowerLoss(10)).toBe(4);
      // A discard is the engine's own map change: until the engine commits, a FUA write with
      // something to commit is the engine's from the start.
      await serve(volume, executor, { target: 'master', op: 'discard', offset: 30 * BS, length: BS }, new Uint8Array(0));
      const declined = fast.declined;
      await write(40, 5, true);
      expect(fast.declined).toBe(declined + 1);
      expect(fast.fuaCommitsHere).toBe(2);
      expect(await afterPowerLoss(40)).toBe(5);
      // The engine changes the map while a FUA first touch's write waits: its thread redirects
      // it, the commit is declined, and the engine takes the whole write again and commits it.
      let go: () => void = () => {};
      const waiting = new Promise<void>((resolve) => (held = (g) => ((go = g), resolve())));
      const fua = write(50, 6, true);
      await within(waiting, 30_000, () => new Error('the FUA write of block 50 never reached its write (30 s)'));
      await serve(volume, executor, { target: 'master', op: 'discard', offset: 60 * BS, length: BS }, new Uint8Array(0));
      go();
      await within(fua, 30_000, () => new Error('the FUA write of block 50 did not complete after its write was let go (30 s)'));
      expect(fast.toEngine).toBe(1);
      expect(fast.redirectedHere).toBe(3);
      expect(fast.fuaCommitsHere).toBe(2);
      expect(await afterPowerLoss(50)).toBe(6);
      expect(Atomics.load(words, PUBLISHED_WORD.commitPending)).toBe(0);
    } finally {
      fast.close();
      await volume.close();
    }
  });

  test('a thread commit captured before the engine took the one before it keeps its journal mark', async () => {
    // Commits back to back on the threads (a flush's, then its FUA commit block's) leave the
    // engine to take the first while the second runs: the journal must not be compacted under
    // the second's mark, which counts bytes of the journal as it was at its capture.
    const dir = await mkdtemp(join(tmpdir(), 'cldd-native-commit-'));
    const store = await formatted(3);
    const volume = await Volume.open(store, { now, journalPath: join(dir, 'pair.mapjournal') });
    const disk = new FastPathDisk(volume, store);
    const r = (disk.fast as unknown as { redirector: NativeRedirector }).redirector;
    const meta = new Uint8Array(64 * 1024);
    const runSteps = async (steps: Float64Array) => {
      for (let i = 0; i < steps.length; i += 4) {
        if (steps[i] === 4) await store.write(meta.subarray(steps[i + 3], steps[i + 3] + steps[i + 2]), steps[i + 1]);
        else await store.flush();
      }
    };
    try {
      await volume.enable();
      const one = new Uint8Array(BS).fill(9);
      // Past the compaction threshold in records, each a first touch its thread redirected.
      const records = Math.ceil(COMPACT_BYTES / RECORD) + 8;
      for (let i = 0; i < records; i++) await disk.write(2 * i * BS, one);
      expect(disk.fast.redirectedHere).toBe(records);
      const pub = nativePublication(volume, r);
      const first = r.captureCommit(pub, meta);
      expect(first).not.toBeNull();
      await runSteps(first!);
      expect(r.commitDone(pub, 0)).toBe(false);
      // One more first touch, and its commit captured before the engine took the first.
      await disk.write(2 * records * BS, one);
      const second = r.captureCommit(pub, meta);
      expect(second).not.toBeNull();
      const during = volume.status().journal!;
      expect(during.uncommittedBytes, 'the second commit\'s record').toBe(RECORD);
      await runSteps(second!);
      expect(r.commitDone(pub, 0)).toBe(false);
      // The engine takes it at its next hold: its own commit's, here.
      await volume.commit();
      const after = volume.status().journal!;
      expect(after.uncommittedBytes).toBe(0);
      expect(during.bytes - after.bytes, 'every record committed: the journal is its header alone').toBe((records + 1) * RECORD);
      // And the map the commits left reads back after a power loss.
      const copy = await Volume.open(copyOf(store), { now });
      try {
        expect((await new Disk(copy).read(2 * records * BS, BS))[0]).toBe(9);
      } finally {
        await copy.close();
      }
    } finally {
      disk.fast.close();
      await volume.close();
      await rm(dir, { recursive: true, force: true });
    }
  });
});
