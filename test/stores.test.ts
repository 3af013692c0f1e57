/**
 * The BlockStore implementations. One behaviour suite runs against the memory, fault-injecting
 * and file stores; the fault store's crash semantics (what a power loss keeps, drops and tears)
 * get their own tests, since every crash test of the engine relies on them.
 */
import { mkdtemp, rm, writeFile, truncate } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { CldError } from '../src/errors.js';
import { type BlockStore, FLUSH, type OrderedStep, inOrder } from '../src/io/block-store.js';
import { FaultStore } from './support/fault-store.js';
import { FileStore } from '../src/io/file-store.js';
import { MemoryStore } from '../src/io/memory-store.js';
import { rng, seedFromEnv } from './support/random.js';
import { SECTOR, stamped, versionOf } from './support/stamp.js';

const SIZE = 1 << 20;

async function rejectsWith(promise: Promise<unknown>, code: string): Promise<CldError> {
  try {
    await promise;
  } catch (err) {
    expect(err).toBeInstanceOf(CldError);
    expect((err as CldError).code).toBe(code);
    return err as CldError;
  }
  throw new Error(`expected a rejection with code ${code}`);
}

function pattern(length: number, salt: number): Uint8Array {
  return Uint8Array.from({ length }, (_, i) => (i * 31 + salt * 7 + (i >> 8)) & 0xff || 1);
}

let dir = '';
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'cldd-stores-'));
});
afterAll(async () => {
  if (dir) await rm(dir, { recursive: true, force: true });
});

let fileCounter = 0;
async function newFileStore(size: number): Promise<FileStore> {
  const path = join(dir, `store-${fileCounter++}.img`);
  await writeFile(path, new Uint8Array(0));
  await truncate(path, size);
  return FileStore.open(path);
}

const kinds: { name: string; make: (size: number) => Promise<BlockStore> }[] = [
  { name: 'MemoryStore', make: async (size) => new MemoryStore(size) },
  { name: 'FaultStore', make: async (size) => new FaultStore(new MemoryStore(size), { random: rng(7), maxLatency: 2 }) },
  { name: 'FileStore', make: newFileStore },
];

describe.each(kinds)('$name', ({ make }) => {
  test('reports_its_size', async () => {
    const store = await make(SIZE + 4096);
    expect(store.size).toBe(SIZE + 4096);
    expect(store.description.length).toBeGreaterThan(0);
    await store.close();
  });

  test('a_fresh_store_reads_zeros', async () => {
    const store = await make(SIZE);
    const buf = new Uint8Array(SIZE).fill(0xee);
    await store.read(buf, 0);
    expect(buf.every((b) => b === 0)).toBe(true);
    await store.close();
  });

  test('write_read_round_trip_at_odd_offsets', async () => {
    const store = await make(SIZE);
    // Odd offsets and lengths that straddle 512-byte and 4 KiB boundaries.
    const writes: [number, number][] = [
      [1, 1],
      [4095, 2],
      [12345, 7777],
      [SIZE - 3, 3],
      [65536 - 511, 4096 * 3 + 1],
    ];
    for (const [i, [offset, length]] of writes.entries()) await store.write(pattern(length, i), offset);
    for (const [i, [offset, length]] of writes.entries()) {
      const buf = new Uint8Array(length);
      await store.read(buf, offset);
      expect(Buffer.from(buf).equals(Buffer.from(pattern(length, i))), `write ${i} at ${offset}`).toBe(true);
    }
    // Bytes next to a write are untouched.
    const around = new Uint8Array(3);
    await store.read(around, 12344);
    expect(around[0]).toBe(0);
    expect(around[1]).toBe(pattern(1, 2)[0]);
    await store.flush();
    await store.close();
  });

  test('zero_reads_back_zeros_and_leaves_the_neighbours', async () => {
    const store = await make(SIZE);
    const data = pattern(20000, 3);
    await store.write(data, 1000);
    await store.zero(5001, 8193); // starts and ends inside 4 KiB chunks, covers whole ones
    const buf = new Uint8Array(20000);
    await store.read(buf, 1000);
    for (let i = 0; i < 20000; i++) {
      const pos = 1000 + i;
      const want = pos >= 5001 && pos < 5001 + 8193 ? 0 : data[i];
      if (buf[i] !== want) throw new Error(`byte ${pos} is ${buf[i]}, expected ${want}`);
    }
    await store.close();
  });

  test('out_of_range_is_EINVAL', async () => {
    const store = await make(SIZE);
    await rejectsWith(store.read(new Uint8Array(2), SIZE - 1), 'EINVAL');
    await rejectsWith(store.write(new Uint8Array(1), SIZE), 'EINVAL');
    await rejectsWith(store.write(new Uint8Array(1), -1), 'EINVAL');
    await rejectsWith(store.read(new Uint8Array(1), -4096), 'EINVAL');
    await rejectsWith(store.zero(SIZE - 512, 1024), 'EINVAL');
    // The failed calls changed nothing.
    const buf = new Uint8Array(1024);
    await store.read(buf, SIZE - 1024);
    expect(buf.every((b) => b === 0)).toBe(true);
    await store.close();
  });
});

describe('FileStore', () => {
  test('data_survives_close_and_reopen', async () => {
    const path = join(dir, 'reopen.img');
    await writeFile(path, new Uint8Array(0));
    await truncate(path, SIZE);
    const a = await FileStore.open(path);
    await a.write(pattern(3000, 9), 777);
    await a.flush();
    await a.close();
    const b = await FileStore.open(path, { readOnly: true });
    const buf = new Uint8Array(3000);
    await b.read(buf, 777);
    expect(Buffer.from(buf).equals(Buffer.from(pattern(3000, 9)))).toBe(true);
    expect(b.isBlockDevice).toBe(false);
    await b.close();
  });

  test('a_missing_path_is_ENOENT_naming_the_path', async () => {
    const path = join(dir, 'no-such-file.img');
    const err = await rejectsWith(FileStore.open(path), 'ENOENT');
    expect(err.message).toContain(path);
  });

  test('a_directory_is_EINVAL', async () => {
    const err = await rejectsWith(FileStore.open(dir), 'EINVAL');
    expect(err.message).toContain(dir);
  });

  test('a_closed_store_refuses_io', async () => {
    const store = await newFileStore(SIZE);
    await store.close();
    await store.close(); // twice is fine
    await rejectsWith(store.read(new Uint8Array(1), 0), 'CLDD_CLOSED');
  });
});

describe('FaultStore', () => {
  /** A store whose sectors [0, sectors) hold stamped version 1, flushed. */
  async function durableV1(sectors: number, random: () => number, maxLatency = 0) {
    const store = new FaultStore(new MemoryStore(SIZE), { random, maxLatency });
    await store.write(stamped(0, sectors, 1), 0);
    await store.flush();
    return store;
  }

  function versions(image: MemoryStore, firstSector: number, sectors: number): number[] {
    const buf = new Uint8Array(sectors * SECTOR);
    image.readSync(buf, firstSector * SECTOR);
    return Array.from({ length: sectors }, (_, i) => versionOf(buf, i * SECTOR, firstSector + i));
  }

  test('reads_see_completed_writes_before_any_flush', async () => {
    const store = new FaultStore(new MemoryStore(SIZE));
    await store.write(stamped(4, 2, 5), 4 * SECTOR);
    const buf = new Uint8Array(2 * SECTOR);
    await store.read(buf, 4 * SECTOR);
    expect([versionOf(buf, 0, 4), versionOf(buf, SECTOR, 5)]).toEqual([5, 5]);
  });

  test('a_crash_after_flush_keeps_the_flushed_writes', async () => {
    const seed = seedFromEnv();
    console.log(`fault store flush seed: ${seed} (replay with CLDD_SEED=${seed})`);
    const random = rng(seed);
    for (let trial = 0; trial < 50; trial++) {
      const store = await durableV1(16, random, 3);
      await Promise.all([store.write(stamped(0, 8, 2), 0), store.zero(12 * SECTOR, 2 * SECTOR)]);
      await store.flush();
      const { image, report } = store.crash();
      expect(report).toEqual({ dropped: 0, applied: 0, torn: 0 });
      expect(versions(image, 0, 16), `[seed ${seed}] trial ${trial}`).toEqual([2, 2, 2, 2, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 1, 1]);
      expect(store.poweredOff).toBe(true);
    }
  });

  test('a_crash_drops_applies_or_tears_unflushed_writes_at_sector_granularity', async () => {
    const seed = seedFromEnv();
    console.log(`fault store crash seed: ${seed} (replay with CLDD_SEED=${seed})`);
    const random = rng(seed);
    const sectors = 16;
    const seen = { dropped: 0, applied: 0, torn: 0, mixed: 0 };
    for (let trial = 0; trial < 200; trial++) {
      const store = await durableV1(sectors, random);
      await store.write(stamped(0, sectors, 2), 0);
      const { image, report } = store.crash();
      const v = versions(image, 0, sectors);
      const where = `[seed ${seed}] trial ${trial}: ${JSON.stringify(report)} gave ${v.join(',')}`;
      // Whole sectors only: every sector is the old or the new version, never a mix or garbage.
      expect(v.every((x) => x === 1 || x === 2), where).toBe(true);
      expect(report.dropped + report.applied + report.torn, where).toBe(1);
      if (report.dropped) expect(v.every((x) => x === 1), where).toBe(true);
      if (report.applied) expect(v.every((x) => x === 2), where).toBe(true);
      if (report.torn && v.includes(1) && v.includes(2)) seen.mixed++;
      seen.dropped += report.dropped;
      seen.applied += report.applied;
      seen.torn += report.torn;
    }
    expect(seen.dropped, `[seed ${seed}]`).toBeGreaterThan(0);
    expect(seen.applied, `[seed ${seed}]`).toBeGreaterThan(0);
    expect(seen.torn, `[seed ${seed}]`).toBeGreaterThan(0);
    expect(seen.mixed, `[seed ${seed}] a torn write that kept some sectors and lost others`).toBeGreaterThan(0);
  });

  /** Torn writes of `sectors` stamped sectors at 0 with scrambleBelow at `limit` sectors. */
  async function scrambleTrials(random: () => number, sectors: number, limit: number, seed: number): Promise<number> {
    let garbled = 0;
    for (let trial = 0; trial < 200; trial++) {
      const store = new FaultStore(new MemoryStore(SIZE), { random, scrambleBelow: limit * SECTOR });
      await store.write(stamped(0, sectors, 1), 0);
      await store.flush();
      await store.write(stamped(0, sectors, 2), 0);
      const v = versions(store.crash().image, 0, sectors);
      const bad = v.map((x, i) => (x === -1 ? i : -1)).filter((i) => i >= 0);
      expect(bad.length, `[seed ${seed}] trial ${trial}: ${v.join(',')}`).toBeLessThanOrEqual(1);
      if (bad.length) expect(bad[0], `[seed ${seed}] trial ${trial}`).toBeLessThan(limit);
      expect(v.every((x) => x === -1 || x === 1 || x === 2)).toBe(true);
      garbled += bad.length;
    }
    return garbled;
  }

  test('scrambleBelow_garbles_at_most_one_sector_of_a_torn_write_below_the_limit', async () => {
    const seed = seedFromEnv();
    console.log(`fault store scramble seed: ${seed} (replay with CLDD_SEED=${seed})`);
    expect(await scrambleTrials(rng(seed), 8, 8, seed), `[seed ${seed}] garbled sectors`).toBeGreaterThan(0);
    expect(await scrambleTrials(rng(seed), 8, 0, seed), `[seed ${seed}] garbled sectors without a limit`).toBe(0);
  });

  /** A torn write that starts below scrambleBelow and ends above it (FaultStore bug: RangeError). */
  test('a_torn_write_straddling_scrambleBelow_garbles_only_below_it', async () => {
    const seed = seedFromEnv();
    console.log(`fault store straddle seed: ${seed} (replay with CLDD_SEED=${seed})`);
    expect(await scrambleTrials(rng(seed), 16, 8, seed), `[seed ${seed}] garbled sectors`).toBeGreaterThan(0);
  });

  test('powerOffAfter_n_interrupts_the_nth_mutation', async () => {
    const seed = seedFromEnv();
    console.log(`fault store power-off seed: ${seed} (replay with CLDD_SEED=${seed})`);
    const random = rng(seed);
    const outcomes = new Set<string>();
    for (let trial = 0; trial < 60; trial++) {
      const store = await durableV1(4, random);
      store.mutations = 0;
      store.powerOffAfter(3);
      await store.write(stamped(0, 1, 2), 0); // 1
      await store.flush(); // 2
      expect(store.poweredOff).toBe(false);
      const err = await rejectsWith(store.write(stamped(1, 1, 3), SECTOR), 'EIO'); // 3: interrupted
      expect(err.message).toMatch(/power is off/);
      expect(store.poweredOff).toBe(true);
      expect(store.mutations).toBe(3);
      // Nothing works once the power is off.
      await rejectsWith(store.read(new Uint8Array(SECTOR), 0), 'EIO');
      await rejectsWith(store.write(new Uint8Array(SECTOR), 0), 'EIO');
      await rejectsWith(store.flush(), 'EIO');
      const v = versions(store.crash().image, 0, 4);
      // The flushed write stays; the interrupted one may or may not have reached the medium.
      expect(v[0]).toBe(2);
      expect([1, 3]).toContain(v[1]);
      expect(v.slice(2)).toEqual([1, 1]);
      outcomes.add(String(v[1]));
    }
    expect([...outcomes].sort(), `[seed ${seed}] the interrupted write both landed and not`).toEqual(['1', '3']);
  });

  test('powerOffAfter_1_interrupts_a_flush_and_loses_nothing_flushed_before', async () => {
    const store = await durableV1(2, rng(3));
    await store.write(stamped(0, 1, 2), 0);
    store.powerOffAfter(1);
    await rejectsWith(store.flush(), 'EIO');
    const v = versions(store.crash().image, 0, 2);
    expect([1, 2]).toContain(v[0]);
    expect(v[1]).toBe(1);
  });

  test('failWhen_injects_EIO_without_effect', async () => {
    const store = await durableV1(8, rng(11));
    store.failWhen((op, offset) => (op === 'write' || op === 'zero') && offset === 2 * SECTOR);
    const err = await rejectsWith(store.write(stamped(2, 2, 9), 2 * SECTOR), 'EIO');
    expect(err.message).toMatch(/injected I\/O error on write at 1024/);
    await rejectsWith(store.zero(2 * SECTOR, SECTOR), 'EIO');
    // Other operations go through.
    await store.write(stamped(4, 1, 9), 4 * SECTOR);
    const buf = new Uint8Array(8 * SECTOR);
    await store.read(buf, 0);
    expect(Array.from({ length: 8 }, (_, i) => versionOf(buf, i * SECTOR, i))).toEqual([1, 1, 1, 1, 9, 1, 1, 1]);
    store.failWhen((op) => op === 'read' || op === 'flush');
    await rejectsWith(store.read(buf, 0), 'EIO');
    await rejectsWith(store.flush(), 'EIO');
    store.failWhen(null);
    await store.flush();
    const { image, report } = store.crash();
    expect(report).toEqual({ dropped: 0, applied: 0, torn: 0 });
    expect(versions(image, 0, 8)).toEqual([1, 1, 1, 1, 9, 1, 1, 1]);
  });

  test('a_flush_covers_only_writes_completed_before_it_was_issued', async () => {
    const seed = seedFromEnv();
    console.log(`fault store cover seed: ${seed} (replay with CLDD_SEED=${seed})`);
    const random = rng(seed);
    let lost = 0;
    for (let trial = 0; trial < 100; trial++) {
      const store = await durableV1(2, random, 4);
      const late = store.write(stamped(1, 1, 2), SECTOR); // in flight while the flush is issued
      await store.flush();
      await late;
      const v = versions(store.crash().image, 0, 2);
      expect([1, 2]).toContain(v[1]);
      if (v[1] === 1) lost++;
    }
    expect(lost, `[seed ${seed}]`).toBeGreaterThan(0);
  });

  /** A write a running flush has taken is still unsynced: a crash may keep it, tear it or lose it. */
  test('a_crash_during_a_flush_may_keep_or_lose_the_writes_it_covers', async () => {
    const seed = seedFromEnv();
    console.log(`fault store crash-in-flush seed: ${seed} (replay with CLDD_SEED=${seed})`);
    const random = rng(seed);
    const outcomes = new Set<number>();
    for (let trial = 0; trial < 60; trial++) {
      const store = new FaultStore(new MemoryStore(SIZE), { random, maxLatency: 4 });
      await store.write(stamped(0, 1, 1), 0);
      const flushing = store.flush().catch(() => {});
      const { image } = store.crash(); // the flush has not completed
      await flushing;
      outcomes.add(versions(image, 0, 1)[0]);
    }
    expect([...outcomes].sort(), `[seed ${seed}] versions seen after a crash during the flush`).toEqual([0, 1]);
  });

  /**
   * A write that completed before a flush was issued is durable once that flush completes,
   * whatever other flushes are running: a FLUSH command covers every write completed before it.
   */
  test('a_flush_covers_earlier_writes_even_while_another_flush_runs', async () => {
    // Latency is scripted: the write completes at once, the first flush is slow, the second fast.
    const script = [0, 0.99, 0];
    const store = new FaultStore(new MemoryStore(SIZE), { random: () => script.shift() ?? 0.5, maxLatency: 8 });
    await store.write(stamped(0, 1, 1), 0);
    const slow = store.flush().catch(() => {}); // the crash below fails it; that is expected
    await store.flush(); // issued after the write completed, and completed
    const { image } = store.crash();
    await slow;
    expect(versions(image, 0, 1), 'the write acknowledged by the second flush').toEqual([1]);
  });
});

describe('inOrder (a commit\'s steps on a store without a sequence of its own)', () => {
  /** A store whose writes and flushes settle only when the test says, recording what started. */
  function gatedStore() {
    const events: string[] = [];
    const pending = new Map<string, { resolve: () => void; reject: (err: Error) => void }>();
    const op = (name: string) => {
      events.push(`start ${name}`);
      return new Promise<void>((resolve, reject) => pending.set(name, { resolve, reject }));
    };
    const store: BlockStore = {
      size: SIZE,
      description: 'gated',
      read: async () => {},
      write: (data, offset) => op(`write ${offset}`),
      zero: async () => {},
      flush: () => op('flush'),
      close: async () => {},
    };
    const settle = async (name: string, err?: Error) => {
      const p = pending.get(name);
      if (!p) throw new Error(`${name} has not started (started: ${events.join(', ')})`);
      pending.delete(name);
      events.push(`end ${name}`);
      if (err) p.reject(err);
      else p.resolve();
      for (let i = 0; i < 5; i++) await Promise.resolve();
    };
    return { store, events, settle };
  }
  const w = (offset: number) => ({ kind: 'write' as const, data: new Uint8Array(512), offset });

  test('writes between flushes start together; a flush starts after them, the next write after it', async () => {
    const { store, events, settle } = gatedStore();
    const done = inOrder(store, [w(0), w(512), FLUSH, w(1024), FLUSH]);
    await settle('write 512');
    expect(events).toEqual(['start write 0', 'start write 512', 'end write 512']);
    await settle('write 0');
    expect(events.at(-1)).toBe('start flush');
    await settle('flush');
    expect(events.at(-1)).toBe('start write 1024');
    await settle('write 1024');
    await settle('flush');
    await done;
  });

  test('the first failure rejects and nothing after it starts', async () => {
    const { store, events, settle } = gatedStore();
    const done = inOrder(store, [w(0), FLUSH, w(512), FLUSH]);
    const outcome = done.catch((err: Error) => err);
    await settle('write 0', new Error('EIO here'));
    expect(await outcome).toMatchObject({ message: 'EIO here' });
    expect(events).toEqual(['start write 0', 'end write 0']);
  });

  test('a store with a sequence of its own runs it instead', async () => {
    const seen: unknown[] = [];
    const store = Object.assign(new MemoryStore(SIZE), { sequence: async (steps: readonly OrderedStep[]) => void seen.push(steps) });
    const steps = [w(0), FLUSH];
    await inOrder(store, steps);
    expect(seen).toEqual([steps]);
  });
});
