import { CldError } from '../errors.js';
import type { Executor } from './plan.js';
import type { Volume } from './volume.js';

export interface ResyncOptions {
  /** Most redirected bytes copied in one step (a merge window), in bytes (default 4 MiB). */
  runBytes?: number;
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
    const maxBlocks = Math.floor(this.runBytes / volume.blockSize);
    const buffer = (this.buffer ??= new Uint8Array(maxBlocks * volume.blockSize));
    let sinceCommit = 0;
    const started = this.clock();
    let bytesThisRun = 0;
    let committing: Promise<void> | null = null;
    try {
      while (!this.stopping && volume.state === 'resync') {
        await this.yieldToForeground();
        const merge = await volume.beginMerge(maxBlocks);
        if (!merge) break;
        let ok = false;
        try {
          const view = buffer.subarray(0, merge.bufferLength);
          if (this.executor.copy) {
            await this.executor.copy(merge.runs, view);
          } else {
            await this.executor.run(merge.reads, view);
            await this.executor.run(merge.writes, view);
          }
          ok = true;
        } finally {
          merge.finish(ok);
        }
        const bytes = merge.blocks * volume.blockSize;
        this.merged += merge.blocks;
        sinceCommit += bytes;
        bytesThisRun += bytes;
        this.record(bytes);
        if (sinceCommit >= this.commitEvery) {
          sinceCommit = 0;
          // The copy goes on while the commit's fdatasyncs write back what it dirtied so far
          // (they run on the store's ring, not on this loop); one commit at a time. Awaited,
          // each one stopped the copy for as long as the writeback took.
          if (committing) await committing;
          committing = volume.commit();
          // A failed commit fails the volume: the next step, or the await below, reports it.
          committing.catch(() => {});
        }
        if (this.rateLimit > 0) {
          const due = started + (bytesThisRun / this.rateLimit) * 1000;
          const wait = due - this.clock();
          if (wait > 0) await sleep(Math.min(wait, 1000));
        }
      }
      // Makes the cleared bits, and the move to plain, durable.
      if (committing) await committing;
      await volume.commit();
    } catch (err) {
      this.lastError = err instanceof CldError ? err : new CldError('EIO', `resync: ${(err as Error).message}`, { cause: err });
      throw this.lastError;
    } finally {
      // No copy is in flight: each was awaited. The buffer's pages are wanted again only at the
      // next resync.
      this.executor.releaseBuffer?.(buffer);
    }
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

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));
