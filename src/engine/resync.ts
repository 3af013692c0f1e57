import { CldError } from '../errors.js';
import type { Executor } from './plan.js';
import type { Volume } from './volume.js';

export interface ResyncOptions {
  /**
   * The copy buffer's size in bytes (default 4 MiB), shared by the two windows copied at once.
   * Where the executor copies itself (`Executor.copy`), a window's runs go through its half a
   * piece at a time; otherwise each window holds at most half of it in redirected blocks (and at
   * least one block).
   */
  runBytes?: number;
  /**
   * Where the executor copies itself: the most redirected bytes of the two windows copied at
   * once (default 64 MiB), each at most half of it (and at least one block), whatever the buffer.
   * Windows are this large only where the store copies them within `windowMs`.
   */
  windowBytes?: number;
  /**
   * How long a window's copy should take, in ms (default 50): a master write into a window's
   * span waits for its copy, so windows are sized from the copy rate measured so far to take
   * about this long, up to `windowBytes`. A run's first windows are each half the buffer.
   */
  windowMs?: number;
  /** Upper bound on the copy rate in bytes per second; 0 for none (default). */
  rateLimit?: number;
  /**
   * How long a step may wait for the foreground to go idle, in ms (default 20): while the master
   * has requests in flight the scheduler waits up to this long before copying anyway, so
   * foreground I/O comes first and the resync still finishes under constant load.
   */
  yieldMs?: number;
  /** Commit the cleared bits after this many copied bytes (default 64 MiB). */
  commitEvery?: number;
}

export interface ResyncProgress {
  running: boolean;
  /** Redirected blocks still to merge. */
  blocksLeft: number;
  blocksMerged: number;
  /** Copy rate over the last few seconds, bytes per second. */
  rate: number;
  /** Estimated seconds to finish at that rate, or null when unknown. */
  secondsLeft: number | null;
  error: string | null;
}

/**
 * The resync scheduler: copies redirected blocks back into the data area in large runs, in the
 * background, after the foreground, and commits as it goes so a restart resumes where it was.
 */
export class ResyncScheduler {
  private readonly runBytes: number;
  private readonly windowBytes: number;
  private readonly windowMs: number;
  /** Milliseconds a window's copy took per redirected block, smoothed; null before the first. */
  private msPerBlock: number | null = null;
  private readonly yieldMs: number;
  private readonly commitEvery: number;
  private rateLimit: number;
  private loop: Promise<void> | null = null;
  private stopping = false;
  private merged = 0;
  private lastError: CldError | null = null;
  private readonly samples: { t: number; bytes: number }[] = [];
  private copiedBytes = 0;
  /**
   * The copy buffer, one for the scheduler's life. A new one per run lingered until V8's next
   * full collection: in the VM (6.12) each disable left another 4 MiB resident, 77.5 MiB after
   * two resyncs against 71.8 after one, and the bench's six pushed the daemon's peak past 80 MiB.
   * Between resyncs its pages go back to the kernel, where the executor can do that.
   */
  private buffer: Uint8Array | null = null;

  constructor(
    private readonly volume: Volume,
    private readonly executor: Executor,
    options: ResyncOptions = {},
    private readonly clock: () => number = () => performance.now(),
  ) {
    this.runBytes = Math.max(volume.blockSize, options.runBytes ?? 4 << 20);
    this.windowBytes = Math.max(volume.blockSize, options.windowBytes ?? WINDOW_BYTES);
    this.windowMs = Math.max(1, options.windowMs ?? WINDOW_MS);
    this.rateLimit = options.rateLimit ?? 0;
    this.yieldMs = options.yieldMs ?? 20;
    this.commitEvery = options.commitEvery ?? 64 << 20;
  }

  /** Starts merging if the volume is resyncing and no loop runs; returns the loop's promise. */
  start(): Promise<void> {
    if (!this.loop) {
      this.stopping = false;
      this.lastError = null;
      this.loop = this.run().finally(() => {
        this.loop = null;
      });
      // The error stays readable in progress(); callers that ignore the promise are fine.
      this.loop.catch(() => {});
    }
    return this.loop;
  }

  /** Stops after the step in flight (progress already made is kept and committed). */
  async stop(): Promise<void> {
    this.stopping = true;
    await this.loop;
  }

  /** Resolves once no loop runs (at once if none does), however the loop ended. */
  ended(): Promise<void> {
    const nothing = () => {};
    return this.loop ? this.loop.then(nothing, nothing) : Promise.resolve();
  }

  setRateLimit(bytesPerSecond: number): void {
    this.rateLimit = Math.max(0, bytesPerSecond);
  }

  progress(): ResyncProgress {
    const blocksLeft = this.volume.state === 'resync' ? this.volume.map.count : 0;
    const rate = this.rate();
    return {
      running: this.loop !== null,
      blocksLeft,
      blocksMerged: this.merged,
      rate,
      secondsLeft: blocksLeft === 0 ? 0 : rate > 0 ? (blocksLeft * this.volume.blockSize) / rate : null,
      error: this.lastError?.message ?? null,
    };
  }

  private async run(): Promise<void> {
    const { volume } = this;
    const bs = volume.blockSize;
    const laneBlocks = Math.max(1, Math.floor(this.runBytes / LANES / bs));
    const buffer = (this.buffer ??= new Uint8Array(LANES * laneBlocks * bs));
    const windowBlocks = this.executor.copy ? Math.max(1, Math.floor(this.windowBytes / LANES / bs)) : laneBlocks;
    this.msPerBlock = null;
    const shared: LaneShared = { sinceCommit: 0, bytesThisRun: 0, started: this.clock(), committing: null, failed: false };
    try {
      const lanes: Promise<void>[] = [];
      for (let i = 0; i < LANES; i++) {
        const half = buffer.subarray(i * laneBlocks * bs, (i + 1) * laneBlocks * bs);
        lanes.push(
          this.lane(half, windowBlocks, shared).catch((err: unknown) => {
            shared.failed = true;
            throw err;
          }),
        );
      }
      // Both lanes end before the buffer is released or the error reported: one that failed
      // stops the other after the window it is copying.
      const ends = await Promise.allSettled(lanes);
      const failure = ends.find((e): e is PromiseRejectedResult => e.status === 'rejected');
      if (failure) throw failure.reason;
      // Makes the cleared bits, and the move to plain, durable.
      if (shared.committing) await shared.committing;
      await volume.commit();
    } catch (err) {
      this.lastError = err instanceof CldError ? err : new CldError('EIO', `resync: ${(err as Error).message}`, { cause: err });
      throw this.lastError;
    } finally {
      // No copy is in flight: both lanes ended. The buffer's pages are wanted again only at the
      // next resync.
      this.executor.releaseBuffer?.(buffer);
    }
  }

  /**
   * One lane of the resync: picks a window, copies it through its half of the buffer, clears its
   * bits, and again. Two lanes run at once, so the main thread picks and finishes one window
   * while a pool thread copies the other. With one, the copy stopped for every window's picking
   * and journal record: 180-340 ms of resyncs of 1.0-1.7 s (6.12 TCG VM, docs/benchmarks.md).
   * Their windows never overlap: each holds its range's merge lock.
   */
  private async lane(buffer: Uint8Array, maxBlocks: number, shared: LaneShared): Promise<void> {
    const { volume } = this;
    while (!this.stopping && !shared.failed && volume.state === 'resync') {
      await this.yieldToForeground();
      const merge = await volume.beginMerge(this.nextWindow(maxBlocks, buffer.length / volume.blockSize));
      if (!merge) break;
      let ok = false;
      try {
        const copying = this.clock();
        if (this.executor.copy) {
          await this.executor.copy(merge.runs, buffer.subarray(0, Math.min(merge.bufferLength, buffer.length)));
        } else {
          const view = buffer.subarray(0, merge.bufferLength);
          await this.executor.run(merge.reads, view);
          await this.executor.run(merge.writes, view);
        }
        const perBlock = (this.clock() - copying) / merge.blocks;
        this.msPerBlock = this.msPerBlock === null ? perBlock : (this.msPerBlock + perBlock) / 2;
        ok = true;
      } finally {
        merge.finish(ok);
      }
      const bytes = merge.blocks * volume.blockSize;
      this.merged += merge.blocks;
      shared.sinceCommit += bytes;
      shared.bytesThisRun += bytes;
      this.record(bytes);
      if (shared.sinceCommit >= this.commitEvery) {
        shared.sinceCommit = 0;
        // The copy goes on while the commit's fdatasyncs write back what it dirtied so far
        // (they run on the store's ring, not on this loop). One commit at a time: each is
        // chained after the one before, and the lane that queues it waits for that one to end.
        // Awaited, each one stopped the copy for as long as the writeback took.
        const previous = shared.committing;
        const next = (previous ?? Promise.resolve()).then(() => volume.commit());
        // A failed commit fails the volume: the next step, or the awaits, report it.
        next.catch(() => {});
        shared.committing = next;
        if (previous) await previous;
      }
      if (this.rateLimit > 0) {
        const due = shared.started + (shared.bytesThisRun / this.rateLimit) * 1000;
        const wait = due - this.clock();
        if (wait > 0) await sleep(Math.min(wait, 1000));
      }
    }
  }

  /**
   * The next window's most redirected blocks: as many as the copy rate measured so far copies in
   * about windowMs, within 1..`most`; the buffer's blocks before anything was measured.
   */
  private nextWindow(most: number, bufferBlocks: number): number {
    if (this.msPerBlock === null) return Math.max(1, Math.min(most, bufferBlocks));
    if (this.msPerBlock <= 0) return most;
    return Math.max(1, Math.min(most, Math.floor(this.windowMs / this.msPerBlock)));
  }

  private async yieldToForeground(): Promise<void> {
    const deadline = this.clock() + this.yieldMs;
    while (this.volume.foregroundInFlight > 0 && this.clock() < deadline && !this.stopping) await sleep(1);
  }

  private record(bytes: number): void {
    const t = this.clock();
    this.copiedBytes += bytes;
    this.samples.push({ t, bytes: this.copiedBytes });
    while (this.samples.length > 2 && t - this.samples[0].t > 5000) this.samples.shift();
  }

  private rate(): number {
    if (this.samples.length < 2) return 0;
    const a = this.samples[0];
    const b = this.samples[this.samples.length - 1];
    return b.t > a.t ? ((b.bytes - a.bytes) * 1000) / (b.t - a.t) : 0;
  }
}

/** Windows copied at once: see lane(). */
const LANES = 2;

/**
 * The defaults for ResyncOptions.windowBytes and windowMs. Each window costs the main thread its
 * picking, its lock, its hand-off and its journal record whatever it holds, and larger windows
 * made the resync faster; but a master write into a window's span waits for its whole copy, and
 * that wait grows with the window and with the store's slowness. Measured in the 7.3 TCG VM
 * (ext4 on brd, 256 MiB of random 4 KiB first touches, windows fixed; a QD1 writer on the master
 * during a second resync of each round; docs/benchmarks.md has the A/Bs): resyncs of 0.77 s
 * (median, 8 rounds) with 4 MiB windows, 0.64 s with 16 MiB, 0.51 s with 64 MiB, and in a second
 * run (9 rounds) 0.84, 0.73 and 0.68 s with 16, 32 and 64 MiB; the writer's longest wait 38-41 ms
 * with 4 or 16 MiB, 64 ms with 32 MiB, 100 ms with 64 MiB (medians of the rounds). So windows
 * are sized by time: about 50 ms of copy each, which is about the longest wait 4 MiB windows
 * already gave there, up to 64 MiB where the store copies fast, and far below it on a disk that
 * copies 32 MiB in half a second. Sized so, in the same VM (9 rounds): resyncs of 0.61 s against
 * 0.84 s with 4 MiB windows and 0.64 s with 64 MiB, the writer's longest wait 62 ms against 38
 * and 95 ms. Those A/Bs gave each build its own pair, and pairs differ in that VM; on one pair
 * with the two alternating (8 rounds) the gain over 4 MiB windows was smaller: 0.41 s against
 * 0.46 s.
 */
const WINDOW_BYTES = 64 << 20;
const WINDOW_MS = 50;

interface LaneShared {
  sinceCommit: number;
  bytesThisRun: number;
  started: number;
  committing: Promise<void> | null;
  /** A lane's copy failed: the other stops after its window. */
  failed: boolean;
}

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));
