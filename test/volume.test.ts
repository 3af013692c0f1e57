/**
 * The engine's Volume: how requests split into extents, the state machine, the snapshot and
 * resync guarantees with self-verifying (stamped) data, recovery on open, and I/O errors.
 */
import { describe, expect, test } from 'vitest';
import { CldError } from '../src/errors.js';
import { check } from '../src/engine/check.js';
import { Disk, StoreExecutor } from './support/disk.js';
import { decodeSuperblock, mapSlotOffset, MAP_SLOT_HEADER, superblockOffset } from '../src/format/format.js';
import type { IoOp, Plan, Request } from '../src/engine/plan.js';
import { ResyncScheduler } from '../src/engine/resync.js';
import { Volume } from '../src/engine/volume.js';
import { FaultStore } from './support/fault-store.js';
import { type OrderedStep, inOrder } from '../src/io/block-store.js';
import { MemoryStore } from '../src/io/memory-store.js';
import { between, rng, seedFromEnv } from './support/random.js';
import { SECTOR, stamped, versionOf } from './support/stamp.js';
import { MutationRecorder } from './support/mutation-recorder.js';
import { digest } from './support/digest.js';
import { commitPage, downgradeToVersion1 } from './support/forge.js';

const MiB = 1 << 20;
const BS = 4096;
const SPB = BS / SECTOR;

// ------------------------------------------------------------------ helpers

interface Pair {
  store: MemoryStore;
  volume: Volume;
  disk: Disk;
}

/** A formatted 8 MiB store: 768 blocks of 4 KiB per area. */
/**
 * Tests that pin which commits, slots and superblock copies the map's mechanics write, or that
 * a write is planned at once, use version 2: in version 3 a write in place to a chunk not yet
 * marked in the tracking period waits for a commit of its tracking page, and a snapshot's writes
 * add tracking pages to the next commit (change-tracking.test.ts tests both).
 */
const MAP_MECHANICS = 2;

async function setup(size = 8 * MiB, version?: 2 | 3): Promise<Pair> {
  const store = new MemoryStore(size);
  const volume = await Volume.format(store, { blockSize: BS, name: 'unit', version });
  return { store, volume, disk: new Disk(volume) };
}

/** Stamped data for blocks [start, end) of the master, at `version`. */
const data = (start: number, end: number, version: number) => stamped(start * SPB, (end - start) * SPB, version);

async function put(disk: Disk, start: number, end: number, version: number, fua = false): Promise<void> {
  await disk.write(start * BS, data(start, end, version), { fua });
}

/** The version each block of `buf` holds (it starts at block `start`); -2 when its sectors disagree. */
function blockVersions(buf: Uint8Array, start: number): number[] {
  const out: number[] = [];
  for (let b = 0; b < buf.length / BS; b++) {
    const first = versionOf(buf, b * BS, (start + b) * SPB);
    let same = true;
    for (let s = 1; s < SPB; s++) if (versionOf(buf, b * BS + s * SECTOR, (start + b) * SPB + s) !== first) same = false;
    out.push(same ? first : -2);
  }
  return out;
}

async function get(disk: Disk, start: number, end: number, target: 'master' | 'slave' = 'master'): Promise<number[]> {
  return blockVersions(await disk.read(start * BS, (end - start) * BS, target), start);
}

/** The versions the data area holds for blocks [start, end), read straight from the store. */
function dataArea(store: MemoryStore, volume: Volume, start: number, end: number): number[] {
  const buf = new Uint8Array((end - start) * BS);
  store.readSync(buf, volume.layout.dataOffset + start * BS);
  return blockVersions(buf, start);
}

async function rejects(promise: Promise<unknown>, code: string, message?: RegExp): Promise<CldError> {
  try {
    await promise;
  } catch (err) {
    expect(err).toBeInstanceOf(CldError);
    expect((err as CldError).code, (err as Error).message).toBe(code);
    if (message) expect((err as Error).message).toMatch(message);
    return err as CldError;
  }
  throw new Error(`expected a rejection with code ${code}`);
}

function throws(fn: () => unknown, code: string, message?: RegExp): CldError {
  try {
    fn();
  } catch (err) {
    expect(err).toBeInstanceOf(CldError);
    expect((err as CldError).code, (err as Error).message).toBe(code);
    if (message) expect((err as Error).message).toMatch(message);
    return err as CldError;
  }
  throw new Error(`expected an error with code ${code}`);
}

function syncPlan(volume: Volume, req: Request): Plan {
  const planned = volume.plan(req);
  if (planned instanceof Promise) throw new Error(`${req.op} at ${req.offset} had to wait`);
  return planned;
}

/** Plans, runs and finishes a request the way serve() does. */
async function runPlan(volume: Volume, req: Request, buffer: Uint8Array): Promise<Plan> {
  const planned = volume.plan(req);
  const plan = planned instanceof Promise ? await planned : planned;
  await new StoreExecutor(volume.store).run(plan.ops, buffer);
  plan.finish(true);
  if (plan.commit) await volume.commit();
  return plan;
}

const ticks = async (n = 20) => {
  for (let i = 0; i < n; i++) await new Promise<void>((resolve) => setImmediate(resolve));
};



/** Opening must fail with `code` and leave every byte of the store as it was. */
async function expectRefusedUntouched(store: MemoryStore, code: string, message?: RegExp): Promise<CldError> {
  const before = digest(store);
  const recorder = new MutationRecorder(store);
  const err = await rejects(Volume.open(recorder), code, message);
  expect(recorder.mutations).toEqual([]);
  await rejects(Volume.open(store), code, message);
  expect(digest(store)).toBe(before);
  return err;
}

function flipByte(store: MemoryStore, offset: number): void {
  const b = new Uint8Array(1);
  store.readSync(b, offset);
  b[0] ^= 0x5a;
  store.writeSync(b, offset);
}

/** `length` bytes from a seeded PRNG. */
function noise(random: () => number, length: number): Uint8Array {
  const words = new Uint32Array(Math.ceil(length / 4));
  for (let i = 0; i < words.length; i++) words[i] = Math.floor(random() * 0x100000000);
  return new Uint8Array(words.buffer, 0, length);
}

const readOp = (offset: number, length: number, bufferOffset: number): IoOp => ({ kind: 'read', offset, length, bufferOffset });

// ------------------------------------------------------------------ extent splitting

describe('extent splitting', () => {
  test('a_master_read_over_alternating_runs_is_one_op_per_run', async () => {
    const { volume, disk } = await setup();
    const { dataOffset: D, changeOffset: C } = volume.layout;
    await put(disk, 0, 64, 1);
    await volume.enable();
    for (const [s, e] of [
      [2, 5],
      [9, 10],
      [11, 20],
      [40, 41],
    ]) {
      await put(disk, s, e, 2);
    }
    const whole = syncPlan(volume, { target: 'master', op: 'read', offset: 0, length: 50 * BS });
    expect(whole.ops).toEqual([
      readOp(D, 2 * BS, 0),
      readOp(C + 2 * BS, 3 * BS, 2 * BS),
      readOp(D + 5 * BS, 4 * BS, 5 * BS),
      readOp(C + 9 * BS, BS, 9 * BS),
      readOp(D + 10 * BS, BS, 10 * BS),
      readOp(C + 11 * BS, 9 * BS, 11 * BS),
      readOp(D + 20 * BS, 20 * BS, 20 * BS),
      readOp(C + 40 * BS, BS, 40 * BS),
      readOp(D + 41 * BS, 9 * BS, 41 * BS),
    ]);
    expect(whole.orderedFinish).toBe(false);
    expect(whole.commit).toBe(false);
    whole.finish(true);
    // Starting inside a run: buffer offsets are relative to the request.
    const part = syncPlan(volume, { target: 'master', op: 'read', offset: 3 * BS, length: 8 * BS });
    expect(part.ops).toEqual([
      readOp(C + 3 * BS, 2 * BS, 0),
      readOp(D + 5 * BS, 4 * BS, 2 * BS),
      readOp(C + 9 * BS, BS, 6 * BS),
      readOp(D + 10 * BS, BS, 7 * BS),
    ]);
    part.finish(true);
    // And the data read that way is right.
    expect(await get(disk, 0, 50)).toEqual(Array.from({ length: 50 }, (_, b) => ([2, 3, 4, 9, 40].includes(b) || (b >= 11 && b < 20) ? 2 : 1)));
  });

  test('master_reads_split_exactly_at_redirection_changes_under_random_writes', async () => {
    const seed = seedFromEnv();
    console.log(`extent seed: ${seed} (replay with CLDD_SEED=${seed})`);
    const random = rng(seed);
    const { volume, disk } = await setup();
    const { blocks, dataOffset: D, changeOffset: C } = volume.layout;
    const executor = new StoreExecutor(volume.store);
    await put(disk, 0, blocks, 1);
    await volume.enable();
    const master = new Int32Array(blocks).fill(1);
    const redirected = new Uint8Array(blocks);
    let version = 1;
    for (let round = 0; round < 30; round++) {
      for (let i = 0; i < 4; i++) {
        const len = between(random, 1, 6);
        const s = between(random, 0, blocks - len);
        await put(disk, s, s + len, ++version);
        master.fill(version, s, s + len);
        redirected.fill(1, s, s + len);
      }
      const len = between(random, 1, 300);
      const s = between(random, 0, blocks - len);
      const want: IoOp[] = [];
      for (let a = s; a < s + len; ) {
        let b = a;
        while (b < s + len && redirected[b] === redirected[a]) b++;
        want.push(readOp((redirected[a] ? C : D) + a * BS, (b - a) * BS, (a - s) * BS));
        a = b;
      }
      const plan = syncPlan(volume, { target: 'master', op: 'read', offset: s * BS, length: len * BS });
      expect(plan.ops, `[seed ${seed}] read of [${s}, ${s + len})`).toEqual(want);
      const buf = new Uint8Array(len * BS);
      await executor.run(plan.ops, buf);
      plan.finish(true);
      expect(blockVersions(buf, s), `[seed ${seed}] data of [${s}, ${s + len})`).toEqual(Array.from(master.subarray(s, s + len)));
    }
  });

  test('a_snapshot_write_of_many_blocks_is_one_change_area_op', async () => {
    const { volume, disk } = await setup(8 * MiB, MAP_MECHANICS);
    const { changeOffset: C } = volume.layout;
    await volume.enable();
    await put(disk, 10, 20, 2); // part of the range is already redirected
    const plan = syncPlan(volume, { target: 'master', op: 'write', offset: 3 * BS, length: 197 * BS });
    expect(plan.ops).toEqual([{ kind: 'write', offset: C + 3 * BS, length: 197 * BS, bufferOffset: 0 }]);
    expect(plan.orderedFinish).toBe(true);
    expect(plan.commit).toBe(false);
    await new StoreExecutor(volume.store).run(plan.ops, data(3, 200, 3));
    plan.finish(true);
    expect(volume.map.count).toBe(197);
    expect(volume.map.nextSet(0)).toBe(3);
    expect(volume.map.windowEnd(0, 1000, 1000)).toBe(200);
    // Discards and write-zeroes in snapshot are one zero op on the change area.
    for (const op of ['discard', 'write-zeroes'] as const) {
      const z = syncPlan(volume, { target: 'master', op, offset: 150 * BS, length: 100 * BS });
      expect(z.ops).toEqual([{ kind: 'zero', offset: C + 150 * BS, length: 100 * BS, bufferOffset: 0 }]);
      z.finish(false);
    }
  });

  test('plain_and_resync_writes_are_one_data_area_op', async () => {
    const { volume, disk } = await setup(8 * MiB, MAP_MECHANICS);
    const { dataOffset: D } = volume.layout;
    const plain = syncPlan(volume, { target: 'master', op: 'write', offset: 5 * BS, length: 300 * BS });
    expect(plain.ops).toEqual([{ kind: 'write', offset: D + 5 * BS, length: 300 * BS, bufferOffset: 0 }]);
    expect(plain.orderedFinish).toBe(false);
    plain.finish(false);
    await volume.enable();
    await put(disk, 0, 3, 2);
    await put(disk, 7, 9, 2);
    await put(disk, 50, 51, 2);
    await volume.disable();
    expect(volume.state).toBe('resync');
    const plan = syncPlan(volume, { target: 'master', op: 'write', offset: 2 * BS, length: 60 * BS });
    expect(plan.ops).toEqual([{ kind: 'write', offset: D + 2 * BS, length: 60 * BS, bufferOffset: 0 }]);
    expect(plan.orderedFinish).toBe(true);
    await new StoreExecutor(volume.store).run(plan.ops, data(2, 62, 3));
    plan.finish(true);
    // The write cleared every bit it covered; block 0 and 1 remain.
    expect(volume.map.count).toBe(2);
    expect(await get(disk, 0, 63)).toEqual(Array.from({ length: 63 }, (_, b) => (b < 2 ? 2 : b < 62 ? 3 : 0)));
  });

  test('slave_reads_only_the_data_area', async () => {
    const { volume, disk } = await setup();
    const { dataOffset: D } = volume.layout;
    await put(disk, 0, 40, 1);
    await volume.enable();
    await put(disk, 5, 10, 2);
    await put(disk, 20, 21, 2);
    const plan = syncPlan(volume, { target: 'slave', op: 'read', offset: 0, length: 40 * BS });
    expect(plan.ops).toEqual([readOp(D, 40 * BS, 0)]);
    expect(plan.orderedFinish).toBe(false);
    plan.finish(true);
    expect(await get(disk, 0, 40, 'slave')).toEqual(new Array(40).fill(1));
  });

  test('orderedFinish_is_true_exactly_when_the_map_changes_and_commit_for_flush_and_fua', async () => {
    const seed = seedFromEnv();
    console.log(`ordered finish seed: ${seed} (replay with CLDD_SEED=${seed})`);
    const random = rng(seed);
    const { volume } = await setup();
    const { blocks } = volume.layout;
    const bits = (s: number, e: number) => {
      const runs: unknown[] = [];
      volume.map.forEachRun(s, e, (a, b, v) => {
        runs.push([a, b, v]);
      });
      return JSON.stringify(runs) + `/${volume.map.count}`;
    };
    const seen = new Set<string>();
    let version = 0;
    const step = async (state: string) => {
      const ops = ['read', 'write', 'write', 'write', 'discard', 'write-zeroes', 'flush'] as const;
      const op = ops[Math.floor(random() * ops.length)];
      const len = between(random, 1, 12);
      const s = between(random, 0, 120 - len);
      const fua = op !== 'read' && op !== 'flush' && random() < 0.3;
      const req: Request = op === 'flush' ? { target: 'master', op, offset: 0, length: 0 } : { target: 'master', op, offset: s * BS, length: len * BS, fua };
      const before = bits(0, blocks);
      const buffer = op === 'write' ? data(s, s + len, ++version) : new Uint8Array(op === 'read' ? len * BS : 0);
      const plan = await runPlan(volume, req, buffer);
      const changed = bits(0, blocks) !== before;
      const where = `[seed ${seed}] ${state} ${op} of [${s}, ${s + len})`;
      expect(plan.orderedFinish, where).toBe(changed);
      expect(plan.commit, where).toBe(op === 'flush' || fua);
      seen.add(`${state}/${op === 'read' || op === 'flush' ? op : 'write'}/${changed}`);
    };
    for (let i = 0; i < 40; i++) await step('plain');
    await volume.enable();
    for (let i = 0; i < 120; i++) await step('snapshot');
    await volume.disable();
    for (let i = 0; i < 40 && volume.state === 'resync'; i++) await step('resync');
    // Every kind of case was exercised.
    for (const c of ['plain/write/false', 'snapshot/write/true', 'snapshot/write/false', 'resync/write/true', 'snapshot/read/false', 'snapshot/flush/false']) {
      expect(seen.has(c), `[seed ${seed}] case ${c} exercised`).toBe(true);
    }
  });
});

// ------------------------------------------------------------------ state machine

describe('state transitions', () => {
  test('enable_twice_is_a_state_error', async () => {
    const { volume } = await setup();
    await volume.enable();
    await rejects(volume.enable(), 'CLDD_STATE', /the slave is already enabled \(snapshot 1\)/);
    expect(volume.state).toBe('snapshot');
    expect(volume.epoch).toBe(1);
  });

  test('disable_in_plain_is_a_state_error', async () => {
    const { volume } = await setup();
    await rejects(volume.disable(), 'CLDD_STATE', /the slave is not enabled \(the state is plain\)/);
    expect(volume.state).toBe('plain');
  });

  test('disable_in_resync_is_a_state_error', async () => {
    const { volume, disk } = await setup();
    await volume.enable();
    await put(disk, 0, 4, 1);
    await volume.disable();
    expect(volume.state).toBe('resync');
    await rejects(volume.disable(), 'CLDD_STATE', /the slave is not enabled \(the state is resync\)/);
  });

  test('enable_from_resync_without_wait_is_a_state_error', async () => {
    const { volume, disk } = await setup();
    await volume.enable();
    await put(disk, 0, 4, 1);
    await volume.disable();
    await rejects(volume.enable(), 'CLDD_STATE', /a resync is still running \(4 blocks left\)/);
    expect(volume.state).toBe('resync');
  });

  test('disable_with_nothing_written_goes_straight_to_plain', async () => {
    const { volume } = await setup();
    await volume.enable();
    await volume.disable();
    expect(volume.state).toBe('plain');
    await volume.enable();
    expect(volume.epoch).toBe(2);
  });

  test('enable_with_wait_from_resync_waits_for_the_resync_then_succeeds', async () => {
    const { store, volume, disk } = await setup();
    await put(disk, 0, 40, 1);
    await volume.enable();
    await put(disk, 10, 30, 2);
    await volume.disable();
    expect(volume.state).toBe('resync');
    let enabled = false;
    const enabling = volume.enable({ wait: true }).then(() => {
      enabled = true;
    });
    await ticks();
    expect(enabled).toBe(false);
    expect(volume.state).toBe('resync');
    // Another state change while it waits is refused.
    await rejects(volume.disable(), 'CLDD_STATE', /another state change is in progress/);
    const scheduler = new ResyncScheduler(volume, new StoreExecutor(store), { runBytes: 4 * BS, yieldMs: 0 });
    await scheduler.start();
    await enabling;
    expect(enabled).toBe(true);
    expect(volume.state).toBe('snapshot');
    expect(volume.epoch).toBe(2);
    // The new snapshot holds the merged image.
    const image = Array.from({ length: 40 }, (_, b) => (b >= 10 && b < 30 ? 2 : 1));
    expect(await get(disk, 0, 40, 'slave')).toEqual(image);
    expect(dataArea(store, volume, 0, 40)).toEqual(image);
  });

  test('concurrent_state_changes_are_refused', async () => {
    const { volume } = await setup();
    const first = volume.enable();
    await rejects(volume.enable(), 'CLDD_STATE', /another state change is in progress/);
    await rejects(volume.disable(), 'CLDD_STATE', /another state change is in progress/);
    await first;
    expect(volume.state).toBe('snapshot');
    const second = volume.disable();
    await rejects(volume.enable(), 'CLDD_STATE', /another state change is in progress/);
    await second;
    expect(volume.state).toBe('plain');
    // Once done, state changes work again.
    await volume.enable();
    expect(volume.epoch).toBe(2);
  });

  test('a_state_change_gives_up_on_a_request_that_never_finishes_and_lets_the_held_ones_go', async () => {
    // A write whose backing I/O never completes: planned, never finished.
    const { volume, disk } = await setup(8 * MiB, MAP_MECHANICS);
    volume.drainLimitMs = 50;
    const stuck = volume.plan({ target: 'master', op: 'write', offset: 0, length: BS }) as Plan;
    const enabling = volume.enable();
    // A request that comes while the enable waits is held at its gate.
    const held = volume.plan({ target: 'master', op: 'read', offset: BS, length: BS });
    expect(held).toBeInstanceOf(Promise);
    await rejects(enabling, 'ETIMEDOUT', /^enable: 1 request\(s\) in flight did not finish within 0.05 s; nothing was changed$/);
    expect(volume.state).toBe('plain');
    // The gate is open again: the held read goes on, as does everything after it.
    const read = await held;
    read.finish(true);
    expect((await disk.read(2 * BS, BS)).length).toBe(BS);
    // Once the stuck write finishes, a state change works.
    stuck.finish(true);
    await volume.enable();
    expect(volume.state).toBe('snapshot');
  });

  test('slave_io_when_not_enabled_is_ENODEV', async () => {
    const { volume, disk } = await setup();
    await rejects(disk.read(0, BS, 'slave'), 'ENODEV', /the slave is not enabled/);
    throws(() => volume.plan({ target: 'slave', op: 'flush', offset: 0, length: 0 }), 'ENODEV');
    await volume.enable();
    await put(disk, 0, 1, 1);
    await volume.disable();
    expect(volume.state).toBe('resync');
    await rejects(disk.read(0, BS, 'slave'), 'ENODEV');
    throws(() => volume.plan({ target: 'slave', op: 'write', offset: 0, length: BS }), 'ENODEV');
  });

  test('slave_writes_are_EROFS', async () => {
    const { volume } = await setup();
    await volume.enable();
    for (const op of ['write', 'discard', 'write-zeroes'] as const) {
      throws(() => volume.plan({ target: 'slave', op, offset: 0, length: BS }), 'EROFS', /read-only/);
    }
    // A slave flush is fine; the read-only slave has nothing to commit.
    const flush = syncPlan(volume, { target: 'slave', op: 'flush', offset: 0, length: 0 });
    expect(flush.ops).toEqual([]);
    expect(flush.commit).toBe(false);
    flush.finish(true);
  });

  test.each([
    ['a_misaligned_offset', BS / 2, BS],
    ['a_misaligned_length', 0, BS + 512],
    ['a_zero_length', 0, 0],
    ['a_negative_length', BS, -BS],
    ['an_offset_past_the_end', 768 * BS, BS],
    ['a_request_running_past_the_end', 767 * BS, 2 * BS],
    ['a_fractional_offset', 0.5, BS],
    ['a_NaN_length', 0, NaN],
  ])('%s_is_EINVAL', async (_what, offset, length) => {
    const { volume } = await setup();
    expect(volume.layout.blocks).toBe(768);
    for (const target of ['master', 'slave'] as const) {
      for (const op of ['read', 'write', 'discard'] as const) {
        if (target === 'slave' && op !== 'read') continue;
        throws(() => volume.plan({ target, op, offset, length }), 'EINVAL');
      }
    }
    // Nothing was left in flight: a state change still goes through.
    await volume.enable();
  });

  test('a_negative_offset_is_EINVAL_and_never_reaches_the_slave', async () => {
    // -4096 % 4096 is -0, which passes an alignment test; a range test must look at the start too.
    const { volume, disk } = await setup();
    const { blocks } = volume.layout;
    await put(disk, 0, blocks, 1);
    await volume.enable();
    // In snapshot, block -1 of the change area is the last block of the data area: the slave.
    const outcome = await disk.write(-BS, data(0, 1, 9)).then(
      () => 'accepted',
      (err: CldError) => err.code,
    );
    expect(await get(disk, blocks - 1, blocks, 'slave'), 'the last block of the slave').toEqual([1]);
    expect(outcome).toBe('EINVAL');
    for (const op of ['read', 'write', 'discard'] as const) {
      throws(() => volume.plan({ target: 'master', op, offset: -BS, length: BS }), 'EINVAL');
    }
    throws(() => volume.plan({ target: 'slave', op: 'read', offset: -BS, length: BS }), 'EINVAL');
  });

  test('a_closed_volume_refuses_requests_and_state_changes', async () => {
    const { volume, disk } = await setup();
    await put(disk, 0, 1, 1);
    await volume.close();
    await volume.close();
    await rejects(disk.read(0, BS), 'CLDD_CLOSED');
    await rejects(volume.enable(), 'CLDD_CLOSED');
  });

  test('untilPlain_after_close_rejects_instead_of_hanging', async () => {
    const { volume, disk } = await setup();
    await volume.enable();
    await put(disk, 0, 1, 1);
    await volume.disable();
    await volume.close();
    const outcome = await Promise.race([
      volume.untilPlain().then(
        () => 'resolved',
        (err: CldError) => err.code,
      ),
      ticks(50).then(() => 'still pending'),
    ]);
    expect(outcome).toBe('CLDD_CLOSED');
  });

  test('close_while_enable_waits_for_a_resync_rejects_the_enable', async () => {
    const { volume, disk } = await setup();
    await volume.enable();
    await put(disk, 0, 1, 1);
    await volume.disable();
    const enabling = volume.enable({ wait: true });
    await ticks();
    await volume.close();
    await rejects(enabling, 'CLDD_CLOSED');
  });
});

// ------------------------------------------------------------------ snapshot and resync data

describe('snapshot and resync', () => {
  test('origin_writes_do_not_affect_snapshot', async () => {
    const seed = seedFromEnv();
    console.log(`origin writes seed: ${seed} (replay with CLDD_SEED=${seed})`);
    const random = rng(seed);
    const { volume, disk } = await setup();
    const { blocks } = volume.layout;
    await put(disk, 0, blocks, 1);
    await volume.enable();
    const master = new Int32Array(blocks).fill(1);
    let version = 1;
    for (let i = 0; i < 80; i++) {
      const len = between(random, 1, 40);
      const s = between(random, 0, blocks - len);
      const r = random();
      if (r < 0.8) {
        await put(disk, s, s + len, ++version, random() < 0.2);
        master.fill(version, s, s + len);
      } else {
        await disk.discard(s * BS, len * BS, r < 0.9 ? 'discard' : 'write-zeroes');
        master.fill(0, s, s + len);
      }
      if (random() < 0.1) await disk.flush();
    }
    expect(await get(disk, 0, blocks, 'slave'), `[seed ${seed}] slave`).toEqual(new Array(blocks).fill(1));
    expect(await get(disk, 0, blocks), `[seed ${seed}] master`).toEqual(Array.from(master));
  });

  test('snapshot_is_stable_across_reopen', async () => {
    const { store, volume, disk } = await setup();
    const { blocks } = volume.layout;
    await put(disk, 0, blocks, 1);
    await volume.enable();
    await put(disk, 100, 200, 2);
    await disk.discard(300 * BS, 10 * BS);
    await disk.flush();
    await volume.close();
    const reopened = await Volume.open(store);
    expect(reopened.state).toBe('snapshot');
    expect(reopened.epoch).toBe(1);
    expect(reopened.name).toBe('unit');
    expect(reopened.map.count).toBe(110);
    const d = new Disk(reopened);
    const master = Array.from({ length: blocks }, (_, b) => (b >= 100 && b < 200 ? 2 : b >= 300 && b < 310 ? 0 : 1));
    expect(await get(d, 0, blocks, 'slave')).toEqual(new Array(blocks).fill(1));
    expect(await get(d, 0, blocks)).toEqual(master);
    // And across a crash: the unflushed write may be lost, the slave never changes.
    const faulty = new FaultStore(MemoryStore.copyOf(store), { random: rng(5) });
    const v = await Volume.open(faulty);
    const fd = new Disk(v);
    await put(fd, 150, 160, 3);
    const { image } = faulty.crash();
    const after = new Disk(await Volume.open(image));
    expect(await get(after, 0, blocks, 'slave')).toEqual(new Array(blocks).fill(1));
    // Torn at sector granularity at worst: every sector is the old or the new version.
    const buf = await after.read(150 * BS, 10 * BS);
    for (let i = 0; i < 10 * SPB; i++) expect([2, 3]).toContain(versionOf(buf, i * SECTOR, 150 * SPB + i));
  });

  test('resync_merges_everything_back', async () => {
    const seed = seedFromEnv();
    console.log(`resync seed: ${seed} (replay with CLDD_SEED=${seed})`);
    const random = rng(seed);
    const { store, volume, disk } = await setup();
    const { blocks } = volume.layout;
    await put(disk, 0, blocks, 1);
    await volume.enable();
    const master = new Int32Array(blocks).fill(1);
    let version = 1;
    for (let i = 0; i < 40; i++) {
      const len = between(random, 1, 30);
      const s = between(random, 0, blocks - len);
      if (random() < 0.85) {
        await put(disk, s, s + len, ++version);
        master.fill(version, s, s + len);
      } else {
        await disk.discard(s * BS, len * BS);
        master.fill(0, s, s + len);
      }
    }
    const redirected = volume.map.count;
    expect(redirected).toBeGreaterThan(0);
    await volume.disable();
    expect(volume.state).toBe('resync');
    const scheduler = new ResyncScheduler(volume, new StoreExecutor(store), { runBytes: 8 * BS, yieldMs: 0, commitEvery: 16 * BS });
    await scheduler.start();
    expect(volume.state).toBe('plain');
    expect(volume.map.count).toBe(0);
    expect(volume.counters.mergedBlocks).toBe(redirected);
    expect(scheduler.progress()).toMatchObject({ running: false, blocksLeft: 0, blocksMerged: redirected, error: null });
    expect(await get(disk, 0, blocks), `[seed ${seed}] master`).toEqual(Array.from(master));
    // Everything is back in the data area itself.
    expect(dataArea(store, volume, 0, blocks), `[seed ${seed}] data area`).toEqual(Array.from(master));
    await volume.close();
    const report = await check(store);
    expect(report.findings).toEqual([]);
    expect(report.superblock?.state).toBe('plain');
    const reopened = await Volume.open(store);
    expect(reopened.state).toBe('plain');
    expect(await get(new Disk(reopened), 0, blocks)).toEqual(Array.from(master));
  });

  test('one_scheduler_copies_every_resync_through_the_same_buffer', async () => {
    // A buffer per run stayed resident until V8's next full collection (4 MiB per disable).
    const { store, volume, disk } = await setup();
    const inner = new StoreExecutor(store);
    const buffers = new Set<ArrayBufferLike>();
    const executor = {
      run: (ops: Parameters<StoreExecutor['run']>[0], buffer: Uint8Array) => {
        buffers.add(buffer.buffer);
        return inner.run(ops, buffer);
      },
    };
    const scheduler = new ResyncScheduler(volume, executor, { runBytes: 8 * BS, yieldMs: 0 });
    await put(disk, 0, 64, 1);
    for (const version of [2, 3]) {
      await volume.enable();
      await put(disk, 8 * version, 8 * version + 20, version);
      await volume.disable();
      await scheduler.start();
      expect(volume.state).toBe('plain');
    }
    expect(scheduler.progress().blocksMerged).toBe(40);
    expect(buffers.size).toBe(1);
    const want = Array.from({ length: 64 }, (_, b) => (b >= 24 && b < 44 ? 3 : b >= 16 && b < 36 ? 2 : 1));
    expect(dataArea(store, volume, 0, 64)).toEqual(want);
  });

  test('the_scheduler_copies_two_disjoint_windows_at_once_and_a_failed_one_stops_both', async () => {
    const { store, volume, disk } = await setup();
    const inner = new StoreExecutor(store);
    await put(disk, 0, 64, 1);
    await volume.enable();
    await put(disk, 0, 32, 2);
    await volume.disable();
    // Every copy waits until the test lets it go; releaseBuffer must come after both.
    const held: { runs: Float64Array; buffer: Uint8Array; go: (ok: boolean) => void }[] = [];
    const events: string[] = [];
    const executor = {
      run: (ops: Parameters<StoreExecutor['run']>[0], buffer: Uint8Array) => inner.run(ops, buffer),
      copy: (runs: Float64Array, buffer: Uint8Array) =>
        new Promise<void>((resolve, reject) => {
          held.push({
            runs,
            buffer,
            go: (ok) => {
              events.push(ok ? 'copied' : 'failed');
              if (!ok) return reject(new CldError('EIO', 'injected copy failure'));
              const reads: IoOp[] = [];
              const writes: IoOp[] = [];
              for (let i = 0; i < runs.length; i += 4) {
                reads.push({ kind: 'read', offset: runs[i], length: runs[i + 2], bufferOffset: runs[i + 3] });
                writes.push({ kind: 'write', offset: runs[i + 1], length: runs[i + 2], bufferOffset: runs[i + 3] });
              }
              inner.run(reads, buffer).then(() => inner.run(writes, buffer)).then(resolve, reject);
            },
          });
        }),
      releaseBuffer: () => events.push('released'),
    };
    const scheduler = new ResyncScheduler(volume, executor, { runBytes: 8 * BS, windowBytes: 8 * BS, yieldMs: 0 });
    const done = scheduler.start();
    done.catch(() => {});
    const until = async (what: string, ok: () => boolean) => {
      for (let i = 0; i < 1000 && !ok(); i++) await ticks(1);
      if (!ok()) throw new Error(`still waiting for ${what} after 1000 turns of the event loop`);
    };
    await until('two copies in flight', () => held.length === 2);
    const [a, b] = held;
    // Two windows of four blocks each, one after the other, each in its own half of one buffer.
    expect([a.runs[1], a.runs[2], b.runs[1], b.runs[2]]).toEqual([volume.layout.dataOffset, 4 * BS, volume.layout.dataOffset + 4 * BS, 4 * BS]);
    expect(a.buffer.buffer).toBe(b.buffer.buffer);
    expect([a.buffer.byteOffset, b.buffer.byteOffset, a.buffer.length, b.buffer.length]).toEqual([0, 4 * BS, 4 * BS, 4 * BS]);
    await ticks();
    expect(held.length).toBe(2);
    b.go(false);
    await ticks();
    // The other lane's window is still copying: nothing released, no new window taken.
    expect([held.length, events]).toEqual([2, ['failed']]);
    a.go(true);
    await rejects(done, 'EIO', /injected copy failure/);
    expect(events).toEqual(['failed', 'copied', 'released']);
    expect(held.length).toBe(2);
    expect(volume.map.count).toBe(28);
    expect(volume.map.nextSet(0)).toBe(4);
    expect(volume.counters.errors).toBe(1);
    expect(dataArea(store, volume, 0, 8)).toEqual([2, 2, 2, 2, 1, 1, 1, 1]);
  });

  test('the_scheduler_sizes_its_windows_by_the_copy_time_it_measures', async () => {
    // A master write into a window's span waits for its copy: windows take about windowMs each,
    // up to windowBytes, whatever the store's speed. The clock is the test's: each copy takes
    // `msPerBlock` per block it copies.
    const windows = async (msPerBlock: number) => {
      const { store, volume, disk } = await setup(32 * MiB);
      const inner = new StoreExecutor(store);
      await put(disk, 0, 2000, 1);
      await volume.enable();
      await put(disk, 0, 2000, 2);
      await volume.disable();
      let now = 0;
      const sizes: number[] = [];
      const executor = {
        run: (ops: Parameters<StoreExecutor['run']>[0], buffer: Uint8Array) => inner.run(ops, buffer),
        // Each run through a buffer of its own: the window's may be shorter than its runs.
        copy: async (runs: Float64Array) => {
          let bytes = 0;
          for (let i = 0; i < runs.length; i += 4) {
            const run = new Uint8Array(runs[i + 2]);
            await inner.run([{ kind: 'read', offset: runs[i], length: runs[i + 2], bufferOffset: 0 }], run);
            await inner.run([{ kind: 'write', offset: runs[i + 1], length: runs[i + 2], bufferOffset: 0 }], run);
            bytes += runs[i + 2];
          }
          sizes.push(bytes / BS);
          now += (bytes / BS) * msPerBlock;
        },
      };
      const options = { runBytes: 16 * BS, windowBytes: 512 * BS, windowMs: 20, yieldMs: 0 };
      await new ResyncScheduler(volume, executor, options, () => now).start();
      expect(volume.state).toBe('plain');
      expect(dataArea(store, volume, 0, 2000)).toEqual(new Array(2000).fill(2));
      expect(sizes.reduce((a, b) => a + b, 0)).toBe(2000);
      return sizes;
    };
    // Before anything is measured, a window is the buffer's half (8 blocks), in each lane.
    const fast = await windows(0);
    expect(fast.slice(0, 2)).toEqual([8, 8]);
    // A store that copies in no time gets the largest windows: half of windowBytes each.
    expect(Math.max(...fast)).toBe(256);
    // At 0.5 ms a block, 20 ms is 40 blocks. On this store the two lanes' copies take turns, so
    // each lane's copy also waits for the other's (20 blocks each here, as a write waiting on
    // either would): never more than 40 blocks, and no collapse to a few.
    const slow = await windows(0.5);
    expect(slow.slice(0, 2)).toEqual([8, 8]);
    expect(Math.max(...slow.slice(2))).toBeLessThanOrEqual(40);
    expect(Math.min(...slow.slice(2, -2))).toBeGreaterThanOrEqual(20);
  });

  test('a_write_to_blocks_being_merged_waits_for_the_merge_and_wins', async () => {
    const { store, volume, disk } = await setup();
    const executor = new StoreExecutor(store);
    await put(disk, 0, 64, 1);
    await volume.enable();
    await put(disk, 0, 64, 2);
    await volume.disable();
    expect(volume.map.count).toBe(64);

    const merge = await volume.beginMerge(32);
    expect(merge).not.toBeNull();
    if (!merge) return;
    expect([merge.start, merge.end, merge.blocks]).toEqual([0, 32, 32]);
    // A write into the locked range has to wait: its plan is a promise, and so is a whole request.
    const waiting = volume.plan({ target: 'master', op: 'write', offset: 8 * BS, length: 4 * BS });
    expect(waiting).toBeInstanceOf(Promise);
    let granted = false;
    const grant = (waiting as Promise<Plan>).then((plan) => {
      granted = true;
      return plan;
    });
    let written = false;
    const writing = put(disk, 20, 22, 4).then(() => {
      written = true;
    });
    await ticks();
    expect([granted, written]).toEqual([false, false]);
    const buffer = new Uint8Array(merge.bufferLength);
    await executor.run(merge.reads, buffer);
    await executor.run(merge.writes, buffer);
    await ticks();
    expect([granted, written]).toEqual([false, false]);
    merge.finish(true);
    const plan = await grant;
    expect(plan.ops).toEqual([{ kind: 'write', offset: volume.layout.dataOffset + 8 * BS, length: 4 * BS, bufferOffset: 0 }]);
    await executor.run(plan.ops, data(8, 12, 3));
    plan.finish(true);
    await writing;
    expect(written).toBe(true);
    expect(volume.foregroundInFlight).toBe(0);

    const want = Array.from({ length: 64 }, (_, b) => (b >= 8 && b < 12 ? 3 : b === 20 || b === 21 ? 4 : 2));
    expect(await get(disk, 0, 64)).toEqual(want);
    expect(dataArea(store, volume, 0, 32)).toEqual(want.slice(0, 32));
    const scheduler = new ResyncScheduler(volume, executor, { yieldMs: 0 });
    await scheduler.start();
    expect(volume.state).toBe('plain');
    expect(await get(disk, 0, 64)).toEqual(want);
    expect(dataArea(store, volume, 0, 64)).toEqual(want);
  });

  test('a_merge_waits_for_a_write_in_flight_and_skips_the_blocks_it_cleared', async () => {
    const { store, volume, disk } = await setup();
    const executor = new StoreExecutor(store);
    await put(disk, 0, 64, 1);
    await volume.enable();
    await put(disk, 0, 64, 2);
    await volume.disable();
    const plan = syncPlan(volume, { target: 'master', op: 'write', offset: 40 * BS, length: 4 * BS });
    expect(plan.orderedFinish).toBe(true);
    let merge: Awaited<ReturnType<Volume['beginMerge']>> | undefined;
    const merging = volume.beginMerge(64).then((m) => {
      merge = m;
    });
    await ticks();
    expect(merge).toBeUndefined();
    await executor.run(plan.ops, data(40, 44, 3));
    plan.finish(true);
    await merging;
    if (!merge) throw new Error('no merge');
    expect([merge.start, merge.end, merge.blocks]).toEqual([0, 64, 60]);
    // Packed in the buffer: the second run right after the first.
    expect(merge.reads.map((op) => [op.offset - volume.layout.changeOffset, op.length, op.bufferOffset])).toEqual([
      [0, 40 * BS, 0],
      [44 * BS, 20 * BS, 40 * BS],
    ]);
    expect(merge.bufferLength).toBe(60 * BS);
    const buffer = new Uint8Array(merge.bufferLength);
    await executor.run(merge.reads, buffer);
    await executor.run(merge.writes, buffer);
    merge.finish(true);
    expect(volume.state).toBe('plain');
    expect(await get(disk, 0, 64)).toEqual(Array.from({ length: 64 }, (_, b) => (b >= 40 && b < 44 ? 3 : 2)));
  });

  test('a_second_merge_of_the_same_blocks_waits_for_the_first_and_never_copies_them_again', async () => {
    // Found by the crash model (seed 3111862763, 5000 points, fast path): two merges held the
    // same blocks at once; after the first cleared their bits a write went to the data area
    // without a lock, and the second merge's stale copy landed over it.
    const { store, volume, disk } = await setup();
    const executor = new StoreExecutor(store);
    await put(disk, 0, 8, 1);
    await volume.enable();
    await put(disk, 0, 8, 2);
    await volume.disable();
    const first = (await volume.beginMerge(64))!;
    let second: Awaited<ReturnType<Volume['beginMerge']>> | undefined;
    const merging = volume.beginMerge(64).then((m) => (second = m));
    await ticks();
    expect(second, 'a second merge of the same blocks waits while the first holds them').toBeUndefined();
    const buffer = new Uint8Array(first.bufferLength);
    await executor.run(first.reads, buffer);
    await executor.run(first.writes, buffer);
    first.finish(true);
    await put(disk, 2, 3, 3); // nothing redirected any more: straight to the data area
    await merging;
    if (second) {
      const again = new Uint8Array(second.bufferLength);
      await executor.run(second.reads, again);
      await executor.run(second.writes, again);
      second.finish(true);
    }
    expect(second, 'nothing is left to merge').toBeNull();
    expect(await get(disk, 0, 8)).toEqual([2, 2, 3, 2, 2, 2, 2, 2]);
  });

  test('discard_and_write_zeroes_read_back_zeros_and_never_change_the_slave', async () => {
    const { store, volume, disk } = await setup();
    await put(disk, 0, 64, 1);
    await disk.discard(60 * BS, 2 * BS); // plain
    expect(await get(disk, 58, 64)).toEqual([1, 1, 0, 0, 1, 1]);
    await volume.enable();
    await disk.discard(4 * BS, 4 * BS);
    await disk.discard(10 * BS, 2 * BS, 'write-zeroes');
    await put(disk, 20, 24, 2);
    await disk.discard(21 * BS, 2 * BS);
    const master = Array.from({ length: 64 }, (_, b) =>
      (b >= 4 && b < 8) || (b >= 10 && b < 12) || b === 21 || b === 22 || b === 60 || b === 61 ? 0 : b === 20 || b === 23 ? 2 : 1,
    );
    const slave = Array.from({ length: 64 }, (_, b) => (b === 60 || b === 61 ? 0 : 1));
    expect(await get(disk, 0, 64)).toEqual(master);
    expect(await get(disk, 0, 64, 'slave')).toEqual(slave);
    expect(dataArea(store, volume, 0, 64)).toEqual(slave);
    await volume.disable();
    await new ResyncScheduler(volume, new StoreExecutor(store), { yieldMs: 0 }).start();
    expect(await get(disk, 0, 64)).toEqual(master);
    expect(dataArea(store, volume, 0, 64)).toEqual(master);
  });

  test('enable_is_durable_when_it_returns', async () => {
    const seed = seedFromEnv();
    console.log(`enable durability seed: ${seed} (replay with CLDD_SEED=${seed})`);
    const random = rng(seed);
    for (let trial = 0; trial < 10; trial++) {
      const store = new FaultStore(new MemoryStore(4 * MiB), { random, maxLatency: 2 });
      const volume = await Volume.format(store, { blockSize: BS });
      const disk = new Disk(volume);
      await put(disk, 0, 32, 1); // never flushed: enable makes it durable
      await volume.enable();
      const { image } = store.crash();
      const reopened = await Volume.open(image);
      expect(reopened.state, `[seed ${seed}] trial ${trial}`).toBe('snapshot');
      expect(reopened.epoch).toBe(1);
      expect(await get(new Disk(reopened), 0, 32, 'slave'), `[seed ${seed}] trial ${trial}`).toEqual(new Array(32).fill(1));
    }
  });

  test('disable_is_durable_when_it_returns', async () => {
    const store = new FaultStore(new MemoryStore(4 * MiB), { random: rng(9), maxLatency: 2 });
    const volume = await Volume.format(store, { blockSize: BS });
    const disk = new Disk(volume);
    await put(disk, 0, 32, 1);
    await volume.enable();
    await put(disk, 8, 16, 2);
    await volume.disable();
    const { image } = store.crash();
    const reopened = await Volume.open(image);
    expect(reopened.state).toBe('resync');
    expect(reopened.map.count).toBe(8);
    expect(await get(new Disk(reopened), 0, 32)).toEqual(Array.from({ length: 32 }, (_, b) => (b >= 8 && b < 16 ? 2 : 1)));
  });
});

// ------------------------------------------------------------------ format and open

describe('format and open', () => {
  test('format_refuses_a_long_name_or_a_small_store_without_writing', async () => {
    const store = new MemoryStore(8 * MiB);
    const fresh = digest(store);
    await rejects(Volume.format(store, { name: 'n'.repeat(65) }), 'EINVAL', /longer than 64 bytes/);
    expect(digest(store)).toBe(fresh);
    const small = new MemoryStore(2 * MiB);
    await rejects(Volume.format(small), 'CLDD_TOO_SMALL', /at least \d+ bytes/);
    await rejects(Volume.format(store, { blockSize: 3000 }), 'EINVAL');
    expect(digest(store)).toBe(fresh);
  });

  test('open_of_a_foreign_store_is_refused_and_leaves_it_byte_identical', async () => {
    const seed = seedFromEnv();
    console.log(`foreign store seed: ${seed} (replay with CLDD_SEED=${seed})`);
    const random = rng(seed);
    const noisy = new MemoryStore(4 * MiB);
    noisy.writeSync(noise(random, 4 * MiB), 0);
    // ext4: 1 KiB of zeros (boot sector), the superblock at 1024 with magic 0xEF53 at 1080,
    // group descriptors and bitmaps after it.
    const ext4 = new MemoryStore(4 * MiB);
    const esb = noise(random, 1024).slice();
    new DataView(esb.buffer).setUint16(56, 0xef53, true);
    ext4.writeSync(esb, 1024);
    ext4.writeSync(noise(random, 64 * 1024), 4096);
    const zeros = new MemoryStore(4 * MiB);
    const tiny = new MemoryStore(300);
    for (const [what, store] of [
      ['random bytes', noisy],
      ['ext4', ext4],
      ['all zeros', zeros],
      ['smaller than a sector', tiny],
    ] as const) {
      const err = await expectRefusedUntouched(store, 'CLDD_FOREIGN', /is not a cldd store/);
      expect(err.message, what).toContain('memory');
    }
  });

  test('open_with_both_superblock_copies_damaged_is_CLDD_CORRUPT_and_writes_nothing', async () => {
    const { store, volume, disk } = await setup();
    await volume.enable();
    await put(disk, 0, 4, 1);
    await volume.close();
    flipByte(store, superblockOffset(0, BS) + 44);
    flipByte(store, superblockOffset(1, BS) + 500);
    await expectRefusedUntouched(store, 'CLDD_CORRUPT', /both superblock copies are damaged \(copy 0: checksum mismatch; copy 1: checksum mismatch\)/);
  });

  function superblockCopies(store: MemoryStore): { state: string; generation: number }[] {
    return [0, 1].map((c) => {
      const buf = new Uint8Array(BS);
      store.readSync(buf, superblockOffset(c, BS));
      const v = decodeSuperblock(buf);
      if (!v.ok) throw new Error(`superblock copy ${c} is invalid: ${v.reason}`);
      return { state: v.sb.state, generation: v.sb.generation };
    });
  }

  test('open_with_one_superblock_copy_damaged_succeeds_and_rewrites_it', async () => {
    const { store, volume, disk } = await setup(8 * MiB, MAP_MECHANICS);
    await put(disk, 0, 8, 1);
    await volume.close();
    // A fresh format: both copies hold generation 1. Damage copy 1; open rewrites both.
    flipByte(store, superblockOffset(1, BS) + 100);
    await (await Volume.open(store)).close();
    expect(superblockCopies(store)).toEqual([
      { state: 'plain', generation: 2 },
      { state: 'plain', generation: 2 },
    ]);
    // Enable writes both copies (generation 3); the close's map commit writes one, copy 0
    // (generation 4). Damage copy 1, one map commit behind.
    const v1 = await Volume.open(store);
    await v1.enable();
    await put(new Disk(v1), 2, 4, 2);
    await v1.close();
    expect(superblockCopies(store)).toEqual([
      { state: 'snapshot', generation: 4 },
      { state: 'snapshot', generation: 3 },
    ]);
    flipByte(store, superblockOffset(1, BS) + 300);
    await (await Volume.open(store)).close();
    expect(superblockCopies(store)).toEqual([
      { state: 'snapshot', generation: 5 },
      { state: 'snapshot', generation: 5 },
    ]);
    // Either copy may be damaged: damage copy 0.
    flipByte(store, superblockOffset(0, BS) + 20);
    const reopened = await Volume.open(store);
    expect(reopened.state).toBe('snapshot');
    expect(superblockCopies(store)).toEqual([
      { state: 'snapshot', generation: 6 },
      { state: 'snapshot', generation: 6 },
    ]);
    expect(await get(new Disk(reopened), 0, 8)).toEqual([1, 1, 2, 2, 1, 1, 1, 1]);
    expect(await get(new Disk(reopened), 0, 8, 'slave')).toEqual(new Array(8).fill(1));
    await reopened.close();
    expect((await check(store)).findings).toEqual([]);
  });

  test('open_with_a_map_page_without_a_valid_slot_is_CLDD_CORRUPT_naming_the_page', async () => {
    const store = new MemoryStore(600 * MiB);
    const volume = await Volume.format(store, { blockSize: BS });
    expect(volume.layout.mapPages).toBe(3);
    await volume.close();
    flipByte(store, mapSlotOffset(volume.layout, 2, 0) + 3000);
    const recorder = new MutationRecorder(store);
    await rejects(Volume.open(recorder), 'CLDD_CORRUPT', /map page 2 has no valid copy \(slot 0: checksum mismatch; slot 1: no map signature\)/);
    expect(recorder.mutations).toEqual([]);
  });

  test('open_rewrites_a_torn_map_slot', async () => {
    const { store, volume, disk } = await setup();
    await volume.enable();
    await put(disk, 0, 3, 1);
    await disk.flush(); // page 0 now in slot 1 (sequence 2); slot 0 holds sequence 1
    await volume.close();
    flipByte(store, mapSlotOffset(volume.layout, 0, 0) + MAP_SLOT_HEADER + 7);
    expect((await check(store)).findings.map((f) => f.severity)).toEqual(['warning']);
    const reopened = await Volume.open(store);
    expect(reopened.map.count).toBe(3);
    expect((await check(store)).findings).toEqual([]);
    await reopened.close();
  });

  test('open_refuses_a_plain_store_with_redirected_blocks_and_a_truncated_store', async () => {
    const { store, volume } = await setup();
    await volume.close();
    const truncated = new MemoryStore(store.size - BS);
    const buf = new Uint8Array(truncated.size);
    store.readSync(buf, 0);
    truncated.writeSync(buf, 0);
    await expectRefusedUntouched(truncated, 'CLDD_CORRUPT', /was truncated/);
    const payload = new Uint8Array(BS - MAP_SLOT_HEADER);
    payload[3] = 1;
    await commitPage(store, 0, payload);
    await expectRefusedUntouched(store, 'CLDD_CORRUPT', /the state is plain but 1 blocks are marked redirected/);
  });
});

// ------------------------------------------------------------------ the committed map

describe('committed map', () => {
  const slotOf = (store: MemoryStore, volume: Volume, page: number, slot: number) => {
    const buf = new Uint8Array(BS);
    store.readSync(buf, mapSlotOffset(volume.layout, page, slot));
    return buf;
  };

  /** Block 0 written and flushed, enabled, written again and flushed: page 0's newest slot is 1. */
  async function snapshotOverwritten(): Promise<Pair> {
    const pair = await setup(8 * MiB, MAP_MECHANICS);
    await put(pair.disk, 0, 1, 1);
    await pair.disk.flush();
    await pair.volume.enable();
    await put(pair.disk, 0, 1, 2);
    await pair.disk.flush();
    await pair.volume.close();
    return pair;
  }

  test.each([
    ['zeroed', (store: MemoryStore, at: number) => store.writeSync(new Uint8Array(BS), at)],
    ['with_a_flipped_payload_byte', (store: MemoryStore, at: number) => flipByte(store, at + MAP_SLOT_HEADER + 1)],
    ['with_a_flipped_magic_byte', (store: MemoryStore, at: number) => flipByte(store, at + 2)],
  ])('a_newest_map_slot_%s_at_rest_is_damage_not_a_rollback', async (_what, damage) => {
    // Once check called it clean, and open went back to the older slot: the master served the
    // pre-snapshot block 0.
    const { store, volume } = await snapshotOverwritten();
    damage(store, mapSlotOffset(volume.layout, 0, 1));
    const report = await check(store);
    expect(report.clean).toBe(false);
    expect(report.findings.filter((f) => f.severity === 'error').map((f) => f.message).join('\n')).toMatch(
      /the map is not the one the superblock records for map commit 1 .*map page 0 (looks damaged|may have lost its newest slot)/,
    );
    await expectRefusedUntouched(store, 'CLDD_CORRUPT', /map page 0 (looks damaged|may have lost its newest slot)/);
  });

  test('zeros_over_superblock_copy_1_and_the_newest_slot_next_to_it_are_damage_not_a_rollback', async () => {
    // One 8 KiB span took the newest superblock copy (1, at B) and page 0's newest slot (0, at
    // 2B): the other copy's record is one commit behind and its digest matched the older slot,
    // so check said clean and open served the previous commit. A slot both commits wrote cannot
    // be blank after a crash: with a superblock copy gone too, that is damage.
    const { store, volume, disk } = await setup();
    await volume.enable();
    await put(disk, 0, 1, 1);
    await disk.flush(); // commit 1: page 0 slot 1
    await put(disk, 1, 2, 2);
    await disk.flush(); // commit 2: page 0 slot 0, superblock copy 1 (acknowledged)
    await volume.close();
    const before = new Uint8Array(BS);
    store.readSync(before, mapSlotOffset(volume.layout, 0, 0));
    expect(before.some((b) => b !== 0)).toBe(true);
    store.writeSync(new Uint8Array(2 * BS), BS);
    const report = await check(store);
    expect(report.clean).toBe(false);
    expect(report.findings.filter((f) => f.severity === 'error').map((f) => f.message).join('\n')).toMatch(/map page 0 has a blank slot although both were written/);
    await expectRefusedUntouched(store, 'CLDD_CORRUPT', /map page 0 has a blank slot/);
  });

  test('a_blank_older_slot_with_both_superblock_copies_intact_is_repaired', async () => {
    const { store, volume, disk } = await setup();
    await volume.enable();
    await put(disk, 0, 1, 1);
    await disk.flush(); // page 0 slot 1 (sequence 2) is the newest; slot 0 holds sequence 1
    await put(disk, 1, 2, 2);
    await disk.flush(); // page 0 slot 0 (sequence 3) the newest, slot 1 the older
    await volume.close();
    store.writeSync(new Uint8Array(BS), mapSlotOffset(volume.layout, 0, 1));
    const report = await check(store);
    expect(report.findings.map((f) => f.message).join('\n')).toMatch(/map page 0 has a blank slot although both were written .*newest version is intact/);
    expect(report.clean).toBe(true);
    const reopened = await Volume.open(store);
    expect(await get(new Disk(reopened), 0, 2)).toEqual([1, 2]);
    await reopened.close();
    expect((await check(store)).findings).toEqual([]);
  });

  test('a_store_in_resync_with_a_damaged_newest_slot_is_refused_not_moved_to_plain', async () => {
    const { store, volume, disk } = await setup();
    await put(disk, 0, 4, 1);
    await volume.enable();
    await put(disk, 0, 4, 2);
    await volume.disable();
    await volume.close();
    expect(superblockState(store)).toBe('resync');
    // The disable's commit wrote page 0's bits into slot 1; without it page 0 looks empty.
    store.writeSync(new Uint8Array(BS), mapSlotOffset(volume.layout, 0, 1));
    await expectRefusedUntouched(store, 'CLDD_CORRUPT', /map page 0 may have lost its newest slot/);
    expect(superblockState(store)).toBe('resync');
  });

  test('map_slots_swapped_between_pages_are_damage', async () => {
    const store = new MemoryStore(600 * MiB);
    const volume = await Volume.format(store, { blockSize: BS });
    const { bitsPerPage, mapPages } = volume.layout;
    expect(mapPages).toBe(3);
    const disk = new Disk(volume);
    await volume.enable();
    await put(disk, 5, 6, 1);
    await put(disk, bitsPerPage + 5, bitsPerPage + 6, 1);
    await disk.flush();
    await volume.close();
    const page0 = slotOf(store, volume, 0, 1);
    const page1 = slotOf(store, volume, 1, 1);
    // Exchanged, and page 1's written over page 0's (a misdirected write).
    for (const [what, writes] of [
      ['exchanged', [[page1, 0], [page0, 1]]],
      ['misdirected', [[page1, 0]]],
    ] as const) {
      const image = MemoryStore.copyOf(store);
      for (const [slot, page] of writes) image.writeSync(slot, mapSlotOffset(volume.layout, page, 1));
      const report = await check(image);
      expect(report.clean, what).toBe(false);
      expect(report.findings.map((f) => f.message).join('\n'), what).toMatch(/map page 0 looks damaged \(slot 0: sequence 1; slot 1: labelled page 1\)/);
      await expectRefusedUntouched(image, 'CLDD_CORRUPT', /map page 0 looks damaged/);
    }
  });

  test('a_lost_write_of_the_newest_superblock_copy_rolls_the_complete_commit_forward', async () => {
    // Enable writes both copies; each map commit then writes one. Losing the newest (here, its
    // write never reached the disk) leaves a copy one map commit behind, and that commit is
    // complete on disk: open adopts it rather than serving the map before it.
    const { store, volume, disk } = await setup(8 * MiB, MAP_MECHANICS);
    await volume.enable();
    const before = new Uint8Array(BS);
    await put(disk, 0, 2, 1);
    await disk.flush();
    store.readSync(before, superblockOffset(1, BS));
    await put(disk, 2, 4, 2);
    await disk.flush(); // map commit 2 wrote copy 1
    await volume.close();
    store.writeSync(before, superblockOffset(1, BS));
    const report = await check(store);
    expect(report.clean).toBe(true);
    expect(report.findings.map((f) => f.message)).toEqual([
      'map commit 2 is complete but the newest valid superblock copy records map commit 1 (an interrupted commit, or a lost superblock write); the next open records it',
    ]);
    expect(report.redirected).toBe(4);
    const reopened = await Volume.open(store);
    expect(await get(new Disk(reopened), 0, 5)).toEqual([1, 1, 2, 2, 0]);
    await reopened.close();
    expect((await check(store)).findings).toEqual([]);
  });

  test('an_uncommitted_slot_is_not_adopted_and_open_overwrites_it', async () => {
    // A commit wrote page 0 but its superblock write never happened, and another of its pages is
    // missing: that commit is not complete, so the map of the recorded commit is served, and open
    // rewrites the stale slot so that no later commit can pick it up.
    const store = new MemoryStore(600 * MiB);
    const volume = await Volume.format(store, { blockSize: BS, version: MAP_MECHANICS });
    const { bitsPerPage } = volume.layout;
    await volume.enable();
    const disk = new Disk(volume);
    await put(disk, 1, 2, 1);
    await disk.flush();
    const saved = MemoryStore.copyOf(store);
    await put(disk, 2, 3, 2);
    await put(disk, bitsPerPage + 1, bitsPerPage + 2, 2);
    await disk.flush();
    // Keep the new slot of page 0 only: as if the power failed during the commit's page writes.
    const page0 = slotOf(store, volume, 0, 0);
    const image = MemoryStore.copyOf(saved);
    image.writeSync(page0, mapSlotOffset(volume.layout, 0, 0));
    const report = await check(image);
    expect(report.clean).toBe(true);
    expect(report.findings.map((f) => f.message)).toEqual([
      'map page 0 holds a version that was never committed (slot 0: sequence 3 of map commit 2, after the committed 1; slot 1: sequence 2); the next open rewrites it',
    ]);
    const reopened = await Volume.open(image);
    expect((await check(image)).findings).toEqual([]);
    const d = new Disk(reopened);
    expect(await get(d, 0, 4)).toEqual([0, 1, 0, 0]);
    expect(reopened.map.count).toBe(1);
    // A later commit of another page only: page 0's stale slot must not come back.
    await put(d, bitsPerPage + 3, bitsPerPage + 4, 3);
    await d.flush();
    await reopened.close();
    const again = await Volume.open(image);
    expect(await get(new Disk(again), 0, 4)).toEqual([0, 1, 0, 0]);
    expect(await get(new Disk(again), bitsPerPage + 1, bitsPerPage + 4)).toEqual([0, 0, 3]);
    expect(again.map.count).toBe(2);
    expect((await check(image)).findings).toEqual([]);
  });

  test('a_version_1_store_opens_is_upgraded_and_check_says_its_map_is_unverified', async () => {
    const { store, volume, disk } = await setup(8 * MiB, 2);
    await put(disk, 0, 2, 1);
    await volume.enable();
    await put(disk, 1, 3, 2);
    await volume.close();
    await downgradeToVersion1(store);
    const v1 = await check(store);
    expect(v1.clean).toBe(true);
    expect(v1.findings).toEqual([
      {
        severity: 'warning',
        message: 'format version 1: the superblock records no map digest, so the map cannot be verified; the next open upgrades the store to version 2',
      },
    ]);
    const reopened = await Volume.open(store);
    expect(reopened.superblock.map).not.toBeNull();
    expect(await get(new Disk(reopened), 0, 4)).toEqual([1, 2, 2, 0]);
    expect(await get(new Disk(reopened), 0, 4, 'slave')).toEqual([1, 1, 0, 0]);
    await reopened.close();
    const buf = new Uint8Array(BS);
    for (const copy of [0, 1]) {
      store.readSync(buf, superblockOffset(copy, BS));
      const v = decodeSuperblock(buf);
      expect(v.ok && v.sb.map !== null, `copy ${copy} is version 2`).toBe(true);
    }
    expect((await check(store)).findings).toEqual([]);
    // Upgraded, the store's newest slot is verified like any other.
    flipByte(store, mapSlotOffset(volume.layout, 0, 1) + 100);
    await expectRefusedUntouched(store, 'CLDD_CORRUPT', /map page 0 looks damaged/);
  });
});

function superblockState(store: MemoryStore): string {
  const buf = new Uint8Array(BS);
  store.readSync(buf, 0);
  const v = decodeSuperblock(buf);
  return v.ok ? v.sb.state : `invalid: ${v.reason}`;
}

// ------------------------------------------------------------------ I/O errors

describe('a commit run by its caller (Volume.commit(run): a flush on its queue thread)', () => {
  const describeSteps = (steps: readonly OrderedStep[]) => steps.map((s) => (s.kind === 'flush' ? 'flush' : `write ${s.offset}`));

  test('the runner gets the steps in order and what it ran is the commit; null leaves them to the store', async () => {
    const { store, volume, disk } = await setup(8 * MiB, MAP_MECHANICS);
    await volume.enable();
    await put(disk, 10, 12, 2);
    const seen: string[][] = [];
    await volume.commit((steps) => {
      seen.push(describeSteps(steps));
      return inOrder(store, steps);
    });
    // The data, then the page, then the superblock, each flushed before the next.
    const page = mapSlotOffset(volume.layout, 0, 1);
    expect(seen).toEqual([['flush', `write ${page}`, 'flush', `write ${superblockOffset(0, BS)}`, 'flush']]);
    await put(disk, 20, 21, 3);
    const declined: number[] = [];
    await volume.commit((steps) => {
      declined.push(steps.length);
      return null;
    });
    expect(declined).toEqual([5]);
    // Both commits are on the store: a crash now (no close) keeps both writes.
    const reopened = new Disk(await Volume.open(MemoryStore.copyOf(store)));
    expect(await get(reopened, 10, 12)).toEqual([2, 2]);
    expect(await get(reopened, 20, 21)).toEqual([3]);
  });

  test('a commit for several callers runs on the first one that brought a runner', async () => {
    const { store, volume, disk } = await setup(8 * MiB, MAP_MECHANICS);
    await volume.enable();
    await put(disk, 1, 2, 2);
    const first = volume.commit(); // runs at once, on the store
    await put(disk, 2, 3, 2);
    const ran: string[] = [];
    const runner = (name: string) => (steps: readonly OrderedStep[]) => {
      ran.push(name);
      return inOrder(store, steps);
    };
    // Both wait for the next commit, which serves them together.
    await Promise.all([first, volume.commit(), volume.commit(runner('a')), volume.commit(runner('b'))]);
    expect(ran).toEqual(['a']);
  });

  test('a runner that fails fails the commit and the volume, as a store error does', async () => {
    const { volume, disk } = await setup(8 * MiB, MAP_MECHANICS);
    await volume.enable();
    await put(disk, 1, 2, 2);
    await rejects(volume.commit(() => Promise.reject(new CldError('EIO', 'the queue thread says no'))), 'EIO', /the queue thread says no/);
    await rejects(disk.read(0, BS), 'EIO', /metadata commit failed/);
  });
});

describe('I/O errors', () => {
  async function faultyPair(): Promise<{ store: FaultStore; volume: Volume; disk: Disk }> {
    const store = new FaultStore(new MemoryStore(8 * MiB), { random: rng(1) });
    const volume = await Volume.format(store, { blockSize: BS });
    return { store, volume, disk: new Disk(volume) };
  }

  test('EIO_reading_the_change_area_fails_the_merge_keeps_its_bits_and_the_resync_finishes_later', async () => {
    const { store, volume, disk } = await faultyPair();
    const { changeOffset } = volume.layout;
    await put(disk, 0, 100, 1);
    await volume.enable();
    await put(disk, 10, 60, 2);
    await volume.disable();
    expect(volume.map.count).toBe(50);
    store.failWhen((op, offset) => op === 'read' && offset >= changeOffset);
    const scheduler = new ResyncScheduler(volume, new StoreExecutor(store), { runBytes: 8 * BS, yieldMs: 0 });
    await rejects(scheduler.start(), 'EIO', /injected I\/O error on read/);
    expect(scheduler.progress().error).toMatch(/injected/);
    expect(volume.map.count).toBe(50);
    expect(volume.map.nextSet(0)).toBe(10);
    expect(volume.state).toBe('resync');
    expect(volume.failed).toBeNull();
    // Both lanes' first windows failed: the scheduler copies two at once.
    expect(volume.counters.errors).toBe(2);
    store.failWhen(null);
    await scheduler.start();
    expect(volume.state).toBe('plain');
    const want = Array.from({ length: 100 }, (_, b) => (b >= 10 && b < 60 ? 2 : 1));
    expect(await get(disk, 0, 100)).toEqual(want);
    await volume.close();
    const reopened = await Volume.open(store.crash().image);
    expect(reopened.state).toBe('plain');
    expect(await get(new Disk(reopened), 0, 100)).toEqual(want);
  });

  test('EIO_writing_the_data_area_during_a_merge_keeps_the_bits_and_the_resync_retries', async () => {
    const { store, volume, disk } = await faultyPair();
    const { dataOffset, changeOffset } = volume.layout;
    await put(disk, 0, 40, 1);
    await volume.enable();
    await put(disk, 0, 40, 2);
    await volume.disable();
    store.failWhen((op, offset) => op === 'write' && offset >= dataOffset + 16 * BS && offset < changeOffset);
    const scheduler = new ResyncScheduler(volume, new StoreExecutor(store), { runBytes: 8 * BS, yieldMs: 0 });
    await rejects(scheduler.start(), 'EIO');
    expect(volume.map.count).toBe(24);
    expect(volume.map.nextSet(0)).toBe(16);
    store.failWhen(null);
    await scheduler.start();
    expect(await get(disk, 0, 40)).toEqual(new Array(40).fill(2));
  });

  test('EIO_on_a_data_write_reaches_the_caller_and_the_volume_keeps_working', async () => {
    const { store, volume, disk } = await faultyPair();
    const { dataOffset, changeOffset } = volume.layout;
    await put(disk, 0, 16, 1);
    store.failWhen((op, offset) => op === 'write' && offset === dataOffset + 5 * BS);
    await rejects(put(disk, 5, 6, 2), 'EIO', /injected I\/O error on write/);
    expect(volume.failed).toBeNull();
    expect(volume.counters.errors).toBe(1);
    await put(disk, 6, 8, 2);
    expect(await get(disk, 0, 8)).toEqual([1, 1, 1, 1, 1, 1, 2, 2]);
    // In snapshot a failed first write leaves the block unredirected: master and slave keep v1.
    await volume.enable();
    store.failWhen((op, offset) => op === 'write' && offset === changeOffset + 3 * BS);
    await rejects(put(disk, 3, 4, 3), 'EIO');
    expect(volume.map.test(3)).toBe(false);
    expect(await get(disk, 0, 8)).toEqual([1, 1, 1, 1, 1, 1, 2, 2]);
    store.failWhen(null);
    await put(disk, 3, 4, 3);
    await disk.flush();
    expect(await get(disk, 0, 8)).toEqual([1, 1, 1, 3, 1, 1, 2, 2]);
    expect(await get(disk, 0, 8, 'slave')).toEqual([1, 1, 1, 1, 1, 1, 2, 2]);
  });

  test('EIO_during_commit_fails_the_volume_and_a_reopen_recovers_every_flushed_write', async () => {
    const { store, volume, disk } = await faultyPair();
    const { mapOffset, dataOffset } = volume.layout;
    await put(disk, 0, 32, 1);
    await volume.enable();
    await put(disk, 0, 4, 2);
    await disk.flush();
    await put(disk, 8, 12, 3, true); // FUA: durable
    await put(disk, 20, 24, 4); // never acknowledged by a flush
    store.failWhen((op, offset) => op === 'write' && offset >= mapOffset && offset < dataOffset);
    const err = await rejects(disk.flush(), 'EIO', /metadata commit failed .*injected I\/O error.*stopped taking I\/O until it is reopened/);
    expect(volume.failed).toBe(err);
    expect(volume.status().failed).toBe(err.message);
    // Nothing else goes through.
    await rejects(disk.read(0, BS), 'EIO', /stopped taking I\/O/);
    await rejects(put(disk, 0, 1, 5), 'EIO', /stopped taking I\/O/);
    await rejects(volume.commit(), 'EIO', /stopped taking I\/O/);
    await rejects(volume.disable(), 'EIO', /stopped taking I\/O/);
    await volume.close();
    store.failWhen(null);
    const { image } = store.crash();
    const report = await check(image);
    expect(report.findings.filter((f) => f.severity === 'error')).toEqual([]);
    const reopened = await Volume.open(image);
    expect(reopened.state).toBe('snapshot');
    const d = new Disk(reopened);
    const master = await get(d, 0, 32);
    expect(master.slice(0, 20)).toEqual([2, 2, 2, 2, 1, 1, 1, 1, 3, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1]);
    expect(master.slice(20, 24).every((x) => x === 1 || x === 4)).toBe(true);
    expect(master.slice(24)).toEqual(new Array(8).fill(1));
    expect(await get(d, 0, 32, 'slave')).toEqual(new Array(32).fill(1));
  });
});
