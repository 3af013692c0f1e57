/**
 * Exhaustive crash points: the power goes off at every single store operation of a state change,
 * a commit and a resync, and the crash is taken both at random and at its worst (every unsynced
 * metadata write garbled, every unsynced data write lost). After each, check finds no damage,
 * the store opens (never CLDD_CORRUPT) and the guarantees hold; and so again when the power also
 * goes off at each operation of the open that repairs it. Complements the randomized crash
 * model, which rarely hits the worst case.
 */
import { describe, expect, test } from 'vitest';
import { check } from '../src/engine/check.js';
import { Disk, StoreExecutor } from './support/disk.js';
import type { IoOp } from '../src/engine/plan.js';
import { ResyncScheduler } from '../src/engine/resync.js';
import { Volume } from '../src/engine/volume.js';
import { FaultStore } from './support/fault-store.js';
import { MemoryStore } from '../src/io/memory-store.js';
import { downgradeToVersion1 } from './support/forge.js';
import { rng, seedFromEnv } from './support/random.js';

const MiB = 1 << 20;
const BS = 4096;
const block = (v: number) => new Uint8Array(BS).fill(v);

/** A store in snapshot with blocks 0..7 = 1 on the slave and 0..3 = 2 on the master, flushed. */
async function prepared(version?: 2 | 3): Promise<MemoryStore> {
  const image = new MemoryStore(8 * MiB);
  const volume = await Volume.format(image, { version });
  const disk = new Disk(volume);
  for (let b = 0; b < 8; b++) await disk.write(b * BS, block(1));
  await volume.enable();
  for (let b = 0; b < 4; b++) await disk.write(b * BS, block(2));
  await disk.flush();
  await volume.close();
  return image;
}

type Action = (volume: Volume, store: FaultStore) => Promise<void>;

/**
 * Chunks written per tracking period (snapshot number), as issued: the prepared history (blocks
 * 0..7 in period 0, 0..3 in period 1: chunk 0 both times), then what the running action issues.
 */
let issued = new Map<number, Set<number>>();
const resetIssued = () => (issued = new Map([[0, new Set([0])], [1, new Set([0])]]));
const CHUNK_BLOCKS = 65536 / BS;

/**
 * Blocks written to the change area per period: such a write is part of the master only once its
 * redirect is durable (a crash before that loses both), so its chunk is owed only then.
 */
let issuedChange = new Map<number, Set<number>>();

/**
 * Writes block b, noting its chunk in the period when the engine issues the write to the store
 * (not when it is asked: a write waiting for its chunk's mark has not reached the store).
 */
async function trackedWrite(volume: Volume, b: number, value: number): Promise<void> {
  const inner = new StoreExecutor(volume.store);
  const noting = {
    run: (ops: readonly IoOp[], buffer: Uint8Array) => {
      const toChange = ops.some((op) => op.offset >= volume.layout.changeOffset);
      if (toChange) {
        issuedChange.set(volume.epoch, (issuedChange.get(volume.epoch) ?? new Set<number>()).add(b));
      } else {
        const set = issued.get(volume.epoch) ?? new Set<number>();
        issued.set(volume.epoch, set.add(Math.floor(b / CHUNK_BLOCKS)));
      }
      return inner.run(ops, buffer);
    },
  };
  await new Disk(volume, noting).write(b * BS, block(value));
}

/** After a crash the tracking sets hold every chunk issued in their periods, never fewer. */
function expectTracking(volume: Volume, where: string): void {
  const t = volume.tracking!;
  expect(t.since, `tracking period after a crash ${where}`).toBe(volume.epoch);
  const chunksOf = (extents: [number, number][]) => {
    const out = new Set<number>();
    for (const [offset, length] of extents) for (let c = offset / 65536; c < (offset + length) / 65536; c++) out.add(c);
    return out;
  };
  const changed = chunksOf(t.changedExtents());
  for (const c of issued.get(volume.epoch) ?? []) expect(changed.has(c), `chunk ${c} written since snapshot ${volume.epoch}, after a crash ${where}`).toBe(true);
  for (const b of issuedChange.get(volume.epoch) ?? []) {
    if (!volume.map.test(b)) continue; // the crash lost the write's redirect, and the write
    const c = Math.floor(b / CHUNK_BLOCKS);
    expect(changed.has(c), `chunk ${c} (redirected block ${b}) written since snapshot ${volume.epoch}, after a crash ${where}`).toBe(true);
  }
  const delta = t.deltaExtents();
  expect(delta, `the last delta after a crash ${where}`).not.toBeNull();
  const previous = chunksOf(delta!);
  for (const c of issued.get(volume.epoch - 1) ?? []) expect(previous.has(c), `chunk ${c} of delta ${volume.epoch - 1} -> ${volume.epoch}, after a crash ${where}`).toBe(true);
}

const ACTIONS: Record<string, { from: 'plain' | 'snapshot'; run: Action; after: string[] }> = {
  enable: {
    from: 'plain',
    run: async (v) => v.enable(),
    after: ['plain', 'snapshot'],
  },
  'disable and resync': {
    from: 'snapshot',
    run: async (v, s) => {
      await v.disable();
      await new ResyncScheduler(v, new StoreExecutor(s), { runBytes: BS, commitEvery: BS, yieldMs: 0 }).start();
    },
    after: ['snapshot', 'resync', 'plain'],
  },
  'write and flush in snapshot': {
    from: 'snapshot',
    run: async (v) => {
      const disk = new Disk(v);
      for (let b = 4; b < 8; b++) await trackedWrite(v, b, 3);
      await disk.flush();
    },
    after: ['snapshot'],
  },
  // Changed-block tracking across periods: writes in resync and plain to new chunks, a snapshot
  // that makes their set the delta, a write in the new period.
  'tracking through disable, resync, writes, enable and a write': {
    from: 'snapshot',
    run: async (v, s) => {
      const disk = new Disk(v);
      await v.disable();
      await trackedWrite(v, 40, 4);
      await new ResyncScheduler(v, new StoreExecutor(s), { runBytes: BS, commitEvery: BS, yieldMs: 0 }).start();
      await trackedWrite(v, 100, 4);
      await disk.flush();
      await v.enable();
      await trackedWrite(v, 200, 5);
      await trackedWrite(v, 2 * CHUNK_BLOCKS + 1, 5);
      await disk.flush();
    },
    after: ['snapshot', 'resync', 'plain'],
  },
  // Map-only commits in a row: each writes one superblock copy, alternating.
  'write and flush, four times, in snapshot': {
    from: 'snapshot',
    run: async (v) => {
      const disk = new Disk(v);
      for (let b = 4; b < 8; b++) {
        await trackedWrite(v, b, 3);
        await disk.flush();
      }
    },
    after: ['snapshot'],
  },
};

/** Opens a crashed image: a crash may leave traces for open to repair, never a damaged store. */
async function openAfterCrash(image: MemoryStore, where: string): Promise<Volume> {
  const report = await check(image);
  expect(report.findings.filter((f) => f.severity === 'error'), `check after a crash ${where}`).toEqual([]);
  try {
    return await Volume.open(image);
  } catch (err) {
    throw new Error(`open after a crash ${where} failed (${(err as { code?: string }).code}): ${(err as Error).message}`);
  }
}

/**
 * The recovery of a crashed image crashes too: the power goes off at each store operation of the
 * open that repairs it (rewritten slots, a commit rolled forward, both superblock copies), and
 * the image left must still open and pass `verify`. Returns how many such points were taken.
 */
async function crashRecovery(
  image: MemoryStore,
  where: string,
  options: { metadataEnd: number; random: () => number },
  verify: (volume: Volume, where: string) => Promise<void>,
): Promise<number> {
  const dry = new FaultStore(MemoryStore.copyOf(image), { scrambleBelow: options.metadataEnd, random: options.random });
  await Volume.open(dry);
  let points = 0;
  for (let j = 1; j <= dry.mutations; j++) {
    for (const worst of [false, true]) {
      const store = new FaultStore(MemoryStore.copyOf(image), { scrambleBelow: options.metadataEnd, random: options.random });
      store.powerOffAfter(j);
      await expect(Volume.open(store)).rejects.toMatchObject({ code: 'EIO' });
      const again = `${where}, then at operation ${j} of the open repairing it (worst: ${worst})`;
      await verify(await openAfterCrash(store.crash({ worst }).image, again), again);
      points++;
    }
  }
  return points;
}

async function startFrom(state: 'plain' | 'snapshot'): Promise<MemoryStore> {
  const image = await prepared();
  if (state === 'snapshot') return image;
  const v = await Volume.open(image);
  await v.disable();
  await new ResyncScheduler(v, new StoreExecutor(image)).start();
  await v.close();
  return image;
}

describe('every crash point of', () => {
  const seed = seedFromEnv();
  console.log(`crash points seed: ${seed} (replay with CLDD_SEED=${seed})`);

  for (const [name, action] of Object.entries(ACTIONS)) {
    test(name, async () => {
      const random = rng(seed);
      // Count the store operations the action takes when nothing goes wrong.
      const base = await startFrom(action.from);
      const metadataEnd = (await Volume.open(MemoryStore.copyOf(base))).layout.dataOffset;
      const dry = new FaultStore(MemoryStore.copyOf(base), { scrambleBelow: metadataEnd, random });
      const dryVolume = await Volume.open(dry);
      const before = dry.mutations;
      await action.run(dryVolume, dry);
      const total = dry.mutations - before;
      expect(total).toBeGreaterThan(2);
      const verify = async (reopened: Volume, where: string) => {
        expect(action.after).toContain(reopened.state);
        expectTracking(reopened, where);
        const disk = new Disk(reopened);
        const master = await disk.read(0, 8 * BS);
        for (let b = 0; b < 8; b++) {
          const v = master[b * BS];
          const allowed = b < 4 ? [2] : name.startsWith('write') ? [1, 3] : [1];
          expect(allowed, `master block ${b} after a crash ${where}`).toContain(v);
          expect(master.subarray(b * BS, (b + 1) * BS).every((x) => x === v)).toBe(true);
        }
        if (reopened.state === 'snapshot') {
          // The slave shows the master as it was when enabled: before this action for enable,
          // blocks 0..3 = 2 and 4..7 = 1; for the others, the prepared snapshot (all 1).
          const slave = await disk.read(0, 8 * BS, 'slave');
          for (let b = 0; b < 8; b++) {
            const want = reopened.epoch === 2 && b < 4 ? 2 : 1;
            expect(slave.subarray(b * BS, (b + 1) * BS).every((x) => x === want), `slave block ${b} after a crash ${where}`).toBe(true);
          }
        }
        if (reopened.state === 'resync') await new ResyncScheduler(reopened, new StoreExecutor(reopened.store)).start();
        if (reopened.state !== 'snapshot') expect(reopened.state).toBe('plain');
        await reopened.close();
      };
      let points = 0;
      let recoveryPoints = 0;
      for (let k = 1; k <= total; k++) {
        for (const worst of [false, true]) {
          resetIssued();
          issuedChange = new Map();
          const store = new FaultStore(MemoryStore.copyOf(base), { scrambleBelow: metadataEnd, random });
          const volume = await Volume.open(store);
          store.powerOffAfter(k);
          await action.run(volume, store).then(
            () => {
              throw new Error(`the action finished although the power went off at operation ${k}`);
            },
            () => {},
          );
          const { image } = store.crash({ worst });
          const where = `at operation ${k} (worst: ${worst})`;
          recoveryPoints += await crashRecovery(image, where, { metadataEnd, random }, verify);
          await verify(await openAfterCrash(image, where), where);
          points++;
        }
      }
      console.log(`${name}: ${points} crash points, ${recoveryPoints} more in the recovery`);
    });
  }

  test('upgrading a version 1 store', async () => {
    const random = rng(seed);
    const base = await prepared(2);
    await downgradeToVersion1(base);
    const metadataEnd = (await Volume.open(MemoryStore.copyOf(base))).layout.dataOffset;
    const dry = new FaultStore(MemoryStore.copyOf(base), { scrambleBelow: metadataEnd, random });
    await Volume.open(dry);
    const total = dry.mutations;
    expect(total).toBeGreaterThan(2);
    const verify = async (reopened: Volume, where: string) => {
      expect(reopened.state).toBe('snapshot');
      expect(reopened.superblock.map).not.toBeNull();
      const disk = new Disk(reopened);
      const master = await disk.read(0, 8 * BS);
      const slave = await disk.read(0, 8 * BS, 'slave');
      for (let b = 0; b < 8; b++) {
        expect(master.subarray(b * BS, (b + 1) * BS).every((x) => x === (b < 4 ? 2 : 1)), `master block ${b} after a crash ${where}`).toBe(true);
        expect(slave.subarray(b * BS, (b + 1) * BS).every((x) => x === 1), `slave block ${b} after a crash ${where}`).toBe(true);
      }
      await reopened.close();
      expect((await check(reopened.store as MemoryStore)).findings, `check after the reopen (crash ${where})`).toEqual([]);
    };
    let points = 0;
    let recoveryPoints = 0;
    for (let k = 1; k <= total; k++) {
      for (const worst of [false, true]) {
        const store = new FaultStore(MemoryStore.copyOf(base), { scrambleBelow: metadataEnd, random });
        store.powerOffAfter(k);
        await expect(Volume.open(store)).rejects.toMatchObject({ code: 'EIO' });
        const { image } = store.crash({ worst });
        const where = `at operation ${k} (worst: ${worst})`;
        recoveryPoints += await crashRecovery(image, where, { metadataEnd, random }, verify);
        await verify(await openAfterCrash(image, where), where);
        points++;
      }
    }
    console.log(`upgrading a version 1 store: ${points} crash points, ${recoveryPoints} more in the recovery`);
  });
});
