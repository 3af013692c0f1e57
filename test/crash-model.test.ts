/**
 * Model-based randomized test with simulated power loss. Random sequences of master and slave
 * reads and writes (various sizes and positions, some concurrent), flushes, FUA writes,
 * discards, enable, disable and resync steps run against the engine on a fault-injecting store
 * and against ReferenceModel. The power goes off at a random store operation (inside commits,
 * state changes and merges too); unsynced writes are dropped or torn; the store is checked
 * offline, reopened, and every sector is checked for the guarantees:
 *   1. every write acknowledged before the last completed flush (or FUA) is readable;
 *   2. the slave image is byte-identical to the enable-time image;
 *   3. an interrupted resync resumes and finishes;
 *   4. changed-block tracking never under-reports: the set since the snapshot, and the last
 *      delta, hold every chunk a write in place was issued to in their periods, and every chunk
 *      whose content differs from the period's start (a write in a snapshot, to the change
 *      area, counts once it can be seen: a crash that lost its redirect lost the write too).
 * Replay a failure with CLDD_SEED=<seed>; scale with CLDD_CRASH_POINTS=<n>.
 */
import { describe, expect, test } from 'vitest';
import { check } from '../src/engine/check.js';
import { Disk, StoreExecutor } from './support/disk.js';
import type { Executor, IoOp } from '../src/engine/plan.js';
import { computeLayout, type VolumeState } from '../src/format/format.js';
import { ResyncScheduler } from '../src/engine/resync.js';
import { Volume } from '../src/engine/volume.js';
import { FaultStore } from './support/fault-store.js';
import { MemoryStore } from '../src/io/memory-store.js';
import { ReferenceModel } from './support/model.js';
import { between, pick, rng, seedFromEnv } from './support/random.js';
import { FastPathDisk } from './support/fast-path.js';
import { SECTOR, stamped, versionOf } from './support/stamp.js';

interface Config {
  label: string;
  blockSize: number;
  storeSize: number;
  /** Block ranges the workload uses (all blocks when absent). */
  windows?: [number, number][];
  maxRequestBlocks: number;
  /** Requests go through the queue threads' fast path where it decides them (support/fast-path.ts). */
  fastPath: boolean;
}

class Trial {
  store!: FaultStore;
  volume!: Volume;
  disk!: Disk | FastPathDisk;
  model!: ReferenceModel;
  private version = 0;
  private blocks = 0;
  crashPoints = 0;
  steps = 0;
  /** Chunks master writes in place were issued to (reached the store), per tracking period. */
  private readonly issued = new Map<number, Set<number>>();
  /** Chunks master writes to the change area were issued to, per period; a crash prunes the lost ones. */
  private readonly issuedChange = new Map<number, Set<number>>();
  /** The master's image when each period began (format, then each enable). */
  private readonly periodStart = new Map<number, Int32Array>();

  constructor(
    readonly random: () => number,
    readonly config: Config,
  ) {}

  async start(): Promise<void> {
    const image = new MemoryStore(this.config.storeSize);
    this.store = new FaultStore(image, { random: this.random, maxLatency: 2, scrambleBelow: this.metadataEnd() });
    this.volume = await Volume.format(this.store, { blockSize: this.config.blockSize, name: 'model' });
    this.attach();
    this.blocks = this.volume.layout.blocks;
    this.model = new ReferenceModel(this.blocks, this.config.blockSize);
    this.periodStart.set(0, this.model.current.slice());
  }

  private metadataEnd(): number {
    return computeLayout(this.config.storeSize, this.config.blockSize).dataOffset;
  }

  fastServed = 0;
  fastDeclined = 0;
  /** First touches in a snapshot the addon's Redirector took, as a queue thread's would. */
  redirectedHere = 0;
  /** Commit fdatasyncs left out because the flush's own sync covered them (a queue thread's RunOwnSync). */
  syncsLeftOut = 0;
  /** Map commits the redirector built for a flush, as a queue thread's CaptureCommit does. */
  commitsHere = 0;
  /** Of those, the commits built for a FUA write (CommitAfterWrite). */
  fuaCommitsHere = 0;

  /** Adds up what the fast path of the volume being left behind served. */
  private tally(): void {
    if (!(this.disk instanceof FastPathDisk)) return;
    this.fastServed += this.disk.fast.served;
    this.fastDeclined += this.disk.fast.declined;
    this.redirectedHere += this.disk.fast.redirectedHere;
    this.syncsLeftOut += this.disk.fast.syncsLeftOut;
    this.commitsHere += this.disk.fast.commitsHere;
    this.fuaCommitsHere += this.disk.fast.fuaCommitsHere;
  }

  private attach(): void {
    this.tally();
    this.disk = this.config.fastPath
      ? new FastPathDisk(this.volume, this.store, this.notingExecutor())
      : new Disk(this.volume, this.notingExecutor());
  }

  /** Runs master requests' I/O on the store, noting the chunks written in the current period. */
  private notingExecutor(): Executor {
    const inner = new StoreExecutor(this.store);
    const { dataOffset, changeOffset, chunkShift } = this.volume.layout;
    return {
      run: (ops: readonly IoOp[], buffer: Uint8Array) => {
        for (const op of ops) {
          if (op.kind === 'read') continue;
          const toChange = op.offset >= changeOffset;
          const master = op.offset - (toChange ? changeOffset : dataOffset);
          const sets = toChange ? this.issuedChange : this.issued;
          const set = sets.get(this.volume.epoch) ?? new Set<number>();
          sets.set(this.volume.epoch, set);
          const size = 2 ** chunkShift;
          for (let c = Math.floor(master / size); c <= Math.floor((master + op.length - 1) / size); c++) set.add(c);
        }
        return inner.run(ops, buffer);
      },
    };
  }

  /**
   * Guarantee 4, after a crash (the model holds what the master reads now): each tracking set
   * holds every chunk written in its period. A period that ended (an enable followed it) drained
   * and committed every write: all count. In the current one, writes in place count as issued,
   * since they may reach the disk before any commit, and writes to the change area count where
   * the master's content now differs from the period's start.
   */
  private verifyTracking(): void {
    const t = this.volume.tracking!;
    const epoch = this.volume.epoch;
    if (t.since !== epoch) throw new Error(`guarantee 4: the tracking set counts from snapshot ${t.since}, the store is at ${epoch}`);
    const chunks = (extents: [number, number][]) => {
      const out = new Set<number>();
      const size = 2 ** t.chunkShift;
      for (const [offset, length] of extents) for (let c = offset / size; c < (offset + length) / size; c++) out.add(c);
      return out;
    };
    const sets: [number, [number, number][] | null][] = [
      [epoch, t.changedExtents()],
      [epoch - 1, t.deltaExtents()],
    ];
    const sectorsPerChunk = 2 ** t.chunkShift / SECTOR;
    const start = this.periodStart.get(epoch);
    if (!start) throw new Error(`the test has no image of the master when snapshot ${epoch}'s period began`);
    const changed = new Set<number>();
    for (let sector = 0; sector < start.length; sector++) {
      if (this.model.current[sector] !== start[sector]) changed.add(Math.floor(sector / sectorsPerChunk));
    }
    // Writes to the change area this crash lost are no longer owed by the current period.
    const current = this.issuedChange.get(epoch);
    for (const c of [...(current ?? [])]) if (!changed.has(c)) current!.delete(c);
    for (const [period, extents] of sets) {
      if (period < 0) continue;
      const wanted = new Set([...(this.issued.get(period) ?? []), ...(this.issuedChange.get(period) ?? [])]);
      if (period === epoch) for (const c of changed) wanted.add(c);
      if (wanted.size === 0) continue;
      if (!extents) throw new Error(`guarantee 4: no delta for snapshot ${period}'s period after the crash`);
      const got = chunks(extents);
      for (const c of wanted) {
        if (!got.has(c)) throw new Error(`guarantee 4: chunk ${c} was written in snapshot ${period}'s period, but the tracking set after the crash misses it`);
      }
    }
  }

  // ------------------------------------------------------------ workload

  private range(maxBlocks = this.config.maxRequestBlocks): [number, number] {
    const windows = this.config.windows ?? [[0, this.blocks]];
    const [lo, hi] = pick(this.random, windows);
    const len = between(this.random, 1, Math.min(maxBlocks, hi - lo));
    const start = between(this.random, lo, hi - len);
    return [start, start + len];
  }

  private async write(start: number, end: number, fua: boolean, op: 'write' | 'discard' | 'write-zeroes' = 'write'): Promise<void> {
    const bs = this.config.blockSize;
    const spb = bs / SECTOR;
    const version = op === 'write' ? ++this.version : 0;
    const entry = this.model.issue(start, end, version);
    if (op === 'write') {
      await this.disk.write(start * bs, stamped(start * spb, (end - start) * spb, version), { fua });
    } else {
      await this.disk.discard(start * bs, (end - start) * bs, op);
      if (fua) await this.disk.flush();
    }
    this.model.complete(entry, start, end, fua);
  }

  private async readMaster(start: number, end: number): Promise<void> {
    const bs = this.config.blockSize;
    const data = await this.disk.read(start * bs, (end - start) * bs);
    this.expectImage(data, start, end, this.model.current, 'master');
  }

  private async readSlave(start: number, end: number): Promise<void> {
    const bs = this.config.blockSize;
    const data = await this.disk.read(start * bs, (end - start) * bs, 'slave');
    this.expectImage(data, start, end, this.model.slave!, 'slave');
  }

  private expectImage(data: Uint8Array, start: number, end: number, expected: Int32Array, what: string): void {
    const spb = this.config.blockSize / SECTOR;
    for (let i = 0; i < (end - start) * spb; i++) {
      const sector = start * spb + i;
      const got = versionOf(data, i * SECTOR, sector);
      if (got !== expected[sector]) {
        throw new Error(`${what} sector ${sector} (block ${Math.floor(sector / spb)}) holds version ${got}, expected ${expected[sector]}`);
      }
    }
  }

  private async flush(): Promise<void> {
    const cover = this.model.flushIssued();
    await this.disk.flush();
    this.model.flushCompleted(cover);
  }

  private noteState(): void {
    this.model.durableStates.add(this.volume.state);
  }

  private async mergeStep(): Promise<void> {
    const merge = await this.volume.beginMerge(between(this.random, 1, 64));
    if (!merge) return;
    const executor = new StoreExecutor(this.store);
    const buffer = new Uint8Array(merge.bufferLength);
    let ok = false;
    try {
      await executor.run(merge.reads, buffer);
      await executor.run(merge.writes, buffer);
      ok = true;
    } finally {
      merge.finish(ok);
      this.noteState();
    }
  }

  /** One random step. Resolves when done; rejects on an unexpected failure or a power-off. */
  async step(): Promise<void> {
    this.steps++;
    try {
      await this.randomStep();
    } finally {
      // A write or merge in resync may have finished it: plain may now reach the superblock.
      this.noteState();
    }
  }

  private async randomStep(): Promise<void> {
    const state = this.volume.state;
    const r = this.random();
    if (r < 0.12) return this.concurrentBatch();
    if (r < 0.42) {
      const [s, e] = this.range();
      return this.write(s, e, this.random() < 0.15);
    }
    if (r < 0.52) return this.readMaster(...this.range());
    if (r < 0.6) return this.flush();
    if (r < 0.65) {
      const [s, e] = this.range();
      return this.write(s, e, this.random() < 0.2, this.random() < 0.5 ? 'discard' : 'write-zeroes');
    }
    if (r < 0.71) {
      if (state === 'snapshot') return this.readSlave(...this.range());
      await expectCode(this.disk.read(0, this.config.blockSize, 'slave'), 'ENODEV');
      return;
    }
    if (r < 0.77) return this.enable();
    if (r < 0.82) return this.disable();
    if (r < 0.94) {
      if (state === 'resync') return this.mergeStep();
      return this.readMaster(...this.range());
    }
    if (r < 0.96 && state === 'resync') return this.finishResync();
    return this.illegal();
  }

  private async enable(): Promise<void> {
    const state = this.volume.state;
    if (state !== 'plain') {
      await expectCode(this.volume.enable(), 'CLDD_STATE');
      return;
    }
    const image = this.model.current.slice();
    this.model.durableStates.add('snapshot');
    this.model.slave = image;
    this.periodStart.set(this.volume.epoch + 1, image);
    await this.volume.enable();
    this.model.settleAll();
    this.model.durableStates = new Set(['snapshot']);
  }

  private async disable(): Promise<void> {
    if (this.volume.state !== 'snapshot') {
      await expectCode(this.volume.disable(), 'CLDD_STATE');
      return;
    }
    this.model.durableStates.add('resync').add('plain');
    await this.volume.disable();
    this.model.settleAll();
    this.model.slave = null;
    this.model.durableStates = new Set([this.volume.state]);
  }

  async finishResync(): Promise<void> {
    this.model.durableStates.add('plain');
    const scheduler = new ResyncScheduler(this.volume, new StoreExecutor(this.store), {
      runBytes: between(this.random, 1, 32) * this.config.blockSize,
      yieldMs: 0,
      commitEvery: between(this.random, 1, 8) * this.config.blockSize,
    });
    await scheduler.start();
    expect(this.volume.state).toBe('plain');
  }

  private async illegal(): Promise<void> {
    const bs = this.config.blockSize;
    const choice = between(this.random, 0, 3);
    if (choice === 0) await expectCode(this.disk.write(bs / 2, new Uint8Array(bs)), 'EINVAL');
    else if (choice === 1) await expectCode(this.disk.read(this.blocks * bs, bs), 'EINVAL');
    else if (choice === 2) {
      const code = this.volume.state === 'snapshot' ? 'EROFS' : 'ENODEV';
      await expectCode((async () => this.volume.plan({ target: 'slave', op: 'write', offset: 0, length: bs }))(), code);
    } else await expectCode(this.disk.read(0, 0), 'EINVAL');
  }

  /** 2-4 requests at once: writes on disjoint ranges, reads beside them, a flush, a merge. */
  private async concurrentBatch(): Promise<void> {
    const busy: [number, number][] = [];
    const free = (s: number, e: number) => busy.every(([a, b]) => e <= a || b <= s);
    const cover = this.model.flushIssued();
    const jobs: Promise<void>[] = [];
    const writes: [number, number][] = [];
    const n = between(this.random, 2, 4);
    for (let i = 0; i < n; i++) {
      const r = this.random();
      const [s, e] = this.range(8);
      if (r < 0.5) {
        if (!free(s, e)) continue;
        busy.push([s, e]);
        writes.push([s, e]);
        jobs.push(this.write(s, e, this.random() < 0.2));
      } else if (r < 0.7) {
        jobs.push(this.readBeside(s, e, writes));
      } else if (r < 0.85) {
        jobs.push(this.disk.flush().then(() => this.model.flushCompleted(cover)));
      } else if (this.volume.state === 'resync') {
        jobs.push(this.mergeStep());
      }
    }
    const results = await Promise.allSettled(jobs);
    for (const r of results) if (r.status === 'rejected') throw r.reason;
  }

  /**
   * A read in a batch checks only the blocks no write of the batch touches. The list of batch
   * writes is complete by the time the read completes: every job is issued before any completes.
   */
  private async readBeside(s: number, e: number, writes: readonly [number, number][]): Promise<void> {
    const bs = this.config.blockSize;
    const data = await this.disk.read(s * bs, (e - s) * bs);
    for (let b = s; b < e; b++) {
      if (writes.some(([a, z]) => a <= b && b < z)) continue;
      this.expectImage(data.subarray((b - s) * bs, (b - s + 1) * bs), b, b + 1, this.model.current, 'master (concurrent)');
    }
  }

  // ------------------------------------------------------------ crash and recovery

  /** Runs random steps until the power goes off at the n-th store mutation, then recovers. */
  async runUntilCrash(mutations: number, maxSteps: number): Promise<void> {
    this.store.powerOffAfter(mutations);
    for (let i = 0; i < maxSteps && !this.store.poweredOff; i++) {
      try {
        await this.step();
      } catch (err) {
        if (!this.store.poweredOff) throw err;
      }
    }
    await this.crashAndRecover();
  }

  async crashAndRecover(): Promise<void> {
    const { image } = this.store.crash();
    // Offline check of the crashed image: a crash may leave torn copies, never damage.
    const report = await check(image);
    const errors = report.findings.filter((f) => f.severity === 'error');
    expect(errors, 'check on a crashed image').toEqual([]);

    this.store = new FaultStore(image, { random: this.random, maxLatency: 2, scrambleBelow: this.metadataEnd() });
    try {
      this.volume = await Volume.open(this.store);
    } catch (err) {
      // Never CLDD_CORRUPT (or anything else) from a crash alone.
      throw new Error(`open after a crash failed (${(err as { code?: string }).code}): ${(err as Error).message}`);
    }
    this.attach();
    const state = this.volume.state;
    if (!this.model.durableStates.has(state)) {
      throw new Error(`after the crash the state is ${state}, expected one of ${[...this.model.durableStates].join(', ')}`);
    }
    await this.verifyAfterCrash(state);
    this.verifyTracking();
    this.crashPoints++;
  }

  private async verifyAfterCrash(state: VolumeState): Promise<void> {
    const bs = this.config.blockSize;
    const spb = bs / SECTOR;
    const windows = this.config.windows ?? [[0, this.blocks]];
    for (const [lo, hi] of windows) {
      const data = await this.disk.read(lo * bs, (hi - lo) * bs);
      const observed = new Int32Array((hi - lo) * spb);
      for (let i = 0; i < observed.length; i++) {
        const sector = lo * spb + i;
        const got = versionOf(data, i * SECTOR, sector);
        const allowed = this.model.candidates(sector);
        if (!allowed.includes(got)) {
          throw new Error(
            `guarantee 1: after the crash master sector ${sector} (block ${Math.floor(sector / spb)}) holds version ${got}; allowed ${allowed.join(', ')} (state ${state})`,
          );
        }
        observed[i] = got;
      }
      this.model.adopt(observed, lo * spb);
      if (state === 'snapshot') {
        const slave = await this.disk.read(lo * bs, (hi - lo) * bs, 'slave');
        const image = this.model.slave;
        if (!image) throw new Error('guarantee 2: the volume came back with a slave that was never enabled');
        this.expectImage(slave, lo, hi, image, 'guarantee 2: slave');
      }
    }
    this.model.resetPending();
    if (state !== 'snapshot') this.model.slave = null;
    this.model.durableStates = new Set([state]);
  }

  /** Guarantee 3: whatever state the crashes left, the resync finishes and keeps the data. */
  async finish(): Promise<void> {
    if (this.volume.state === 'snapshot') {
      const [s, e] = this.range();
      await this.readSlave(s, e);
      await this.disable();
    }
    if (this.volume.state === 'resync') await this.finishResync();
    expect(this.volume.state).toBe('plain');
    const windows = this.config.windows ?? [[0, this.blocks]];
    for (const [lo, hi] of windows) await this.readMaster(lo, hi);
    this.tally();
    await this.volume.close();
    const report = await check(this.store);
    expect(report.findings).toEqual([]);
    expect(report.redirected).toBe(0);
  }
}

async function expectCode(promise: Promise<unknown>, code: string): Promise<void> {
  try {
    await promise;
  } catch (err) {
    if ((err as { code?: string }).code === code) return;
    throw err;
  }
  throw new Error(`expected an error with code ${code}`);
}

const MiB = 1 << 20;
const CONFIGS: { weight: number; make: (random: () => number) => Omit<Config, 'fastPath'> }[] = [
  {
    weight: 0.7,
    make: (random) => ({
      label: 'small, 4 KiB blocks',
      blockSize: 4096,
      storeSize: 3 * MiB + between(random, 0, 64) * 4096,
      maxRequestBlocks: 48,
    }),
  },
  {
    weight: 0.15,
    make: (random) => ({
      label: 'large blocks',
      blockSize: pick(random, [8192, 16384, 65536]),
      storeSize: 4 * MiB + between(random, 0, 16) * 65536,
      maxRequestBlocks: 8,
    }),
  },
  {
    weight: 0.15,
    make: () => {
      // Three map pages: the workload straddles the page boundaries and the last block.
      const bitsPerPage = (4096 - 64) * 8;
      const blocks = 2 * bitsPerPage + 2000;
      return {
        label: 'three map pages',
        blockSize: 4096,
        storeSize: 2 * MiB + 2 * blocks * 4096 + 2 * MiB,
        windows: [
          [0, 64],
          [bitsPerPage - 40, bitsPerPage + 40],
          [2 * bitsPerPage - 40, 2 * bitsPerPage + 40],
        ],
        maxRequestBlocks: 64,
      };
    },
  },
];

describe('crash model', () => {
  // Each workload twice: every request planned by the engine, and the requests the queue threads
  // serve by themselves (reads, plain writes, writes to redirected blocks, flushes with nothing to
  // commit) through the native fast path's own decisions.
  test.each([
    { fastPath: false, label: 'every request planned by the engine', points: 2400 },
    { fastPath: true, label: 'through the fast path', points: 1600 },
  ])('random workloads with power loss keep every guarantee: $label', async ({ fastPath, label, points }) => {
    const seed = seedFromEnv();
    const target = Number(process.env.CLDD_CRASH_POINTS ?? points);
    console.log(`crash model (${label}) seed: ${seed} (replay with CLDD_SEED=${seed})`);
    const random = rng(seed);
    let crashPoints = 0;
    let trials = 0;
    let steps = 0;
    let fastServed = 0;
    let fastDeclined = 0;
    let redirectedHere = 0;
    let syncsLeftOut = 0;
    let commitsHere = 0;
    let fuaCommitsHere = 0;
    const started = performance.now();
    try {
      while (crashPoints < target) {
        let roll = random();
        const cfg = CONFIGS.find((c) => (roll -= c.weight) < 0) ?? CONFIGS[0];
        const trial = new Trial(random, { ...cfg.make(random), fastPath });
        await trial.start();
        trials++;
        const crashes = between(random, 1, 4);
        for (let c = 0; c < crashes; c++) {
          // Run a little without power trouble, then lose power at a random store operation.
          const calm = between(random, 0, 12);
          for (let i = 0; i < calm; i++) await trial.step();
          await trial.runUntilCrash(between(random, 1, 80), 200);
        }
        await trial.finish();
        fastServed += trial.fastServed;
        fastDeclined += trial.fastDeclined;
        redirectedHere += trial.redirectedHere;
        syncsLeftOut += trial.syncsLeftOut;
        commitsHere += trial.commitsHere;
        fuaCommitsHere += trial.fuaCommitsHere;
        crashPoints += trial.crashPoints;
        steps += trial.steps;
      }
    } catch (err) {
      (err as Error).message = `[seed ${seed}, trial ${trials}] ${(err as Error).message}`;
      throw err;
    }
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    console.log(`crash points: ${crashPoints}`);
    console.log(`crash model (${label}): ${trials} volumes, ${steps} steps, ${seconds} s, seed ${seed}`);
    if (fastPath) {
      // The fast path must really take part: most reads and writes of a workload are its.
      expect(fastServed, 'requests the fast path served').toBeGreaterThan(fastDeclined);
      console.log(
        `fast path: served ${fastServed}, left ${fastDeclined} to the engine; ${redirectedHere} first touches redirected by the redirector; ${syncsLeftOut} commit fdatasyncs left to a flush's own; ${commitsHere} map commits built by the redirector, ${fuaCommitsHere} of them for a FUA write`,
      );
      expect(redirectedHere, 'first touches the redirector took').toBeGreaterThan(0);
      expect(commitsHere - fuaCommitsHere, "map commits the redirector built for a flush").toBeGreaterThan(0);
      expect(fuaCommitsHere, 'map commits the redirector built for a FUA write').toBeGreaterThan(0);
      expect(syncsLeftOut, "commit fdatasyncs a flush's own sync covered").toBeGreaterThan(0);
    }
    expect(crashPoints).toBeGreaterThanOrEqual(target);
  }, 600_000);
});
