import { CldError, asCldError } from '../errors.js';
import { addon } from '../native/addon.js';
import { releasePages } from './pages.js';
import type { NativeStoreHandle } from '../native/native.js';
import { EXTENT_KIND } from '../native/wire.js';
import { type BlockStore, type IoOp, type OrderedStep, packSteps, writtenBytes } from './block-store.js';

export interface NativeStoreOptions {
  readOnly?: boolean;
  /**
   * Take an exclusive advisory lock (flock) so that a second server on the same backing file is
   * refused with EBUSY. The lock dies with the process, so a restart after a crash is not refused.
   */
  lock?: boolean;
}

// native/wire.h's kinds: a store's flush is an fdatasync.
const KIND = { read: EXTENT_KIND.read, write: EXTENT_KIND.write, zero: EXTENT_KIND.zero, flush: EXTENT_KIND.sync } as const;

/**
 * A regular file or block device whose reads, writes, flushes (fdatasync) and zeroing (punched
 * holes) go through io_uring in the native addon. The ublk queues use the same fd (`fd`), so a
 * flush here covers every data write the queues completed before it.
 */
export class NativeStore implements BlockStore {
  private closed = false;
  /**
   * The size the addon measured at open, read once: every op checks its range against it, and
   * a property of the native object costs a call into the addon, which a resync's 26,000 runs
   * made twice each on the main thread the copy shares two vCPUs with (docs/benchmarks.md).
   */
  readonly size: number;

  private constructor(
    private readonly handle: NativeStoreHandle,
    readonly description: string,
  ) {
    this.size = handle.size;
  }

  static open(path: string, options: NativeStoreOptions = {}): NativeStore {
    const { Store } = addon();
    let handle: NativeStoreHandle;
    try {
      handle = new Store(path, options.readOnly === true, options.lock === true);
    } catch (err) {
      throw asCldError(err);
    }
    return new NativeStore(handle, path);
  }

  get isBlockDevice(): boolean {
    return this.handle.isBlockDevice;
  }

  /**
   * A file only: whether its file system punches holes, which zero() and a merge's copy ask of
   * it (vfat, exFAT and NFSv3 refuse). Asked with a punch past the end, which changes nothing.
   */
  punchesHoles(): boolean {
    if (this.closed) throw this.closedError('punchesHoles');
    try {
      return this.handle.punchesHoles();
    } catch (err) {
      throw asCldError(err);
    }
  }

  /** The backing fd, shared with the ublk queues. */
  get fd(): number {
    return this.handle.fd;
  }

  async read(buffer: Uint8Array, offset: number): Promise<void> {
    this.checkRange('read', offset, buffer.length);
    await this.handle.read(buffer, offset).catch(rethrow);
  }

  async write(data: Uint8Array, offset: number): Promise<void> {
    this.checkRange('write', offset, data.length);
    await this.handle.write(data, offset).catch(rethrow);
  }

  async zero(offset: number, length: number): Promise<void> {
    this.checkRange('zero', offset, length);
    await this.handle.zero(offset, length).catch(rethrow);
  }

  async flush(): Promise<void> {
    if (this.closed) throw this.closedError('flush');
    await this.handle.flush().catch(rethrow);
  }

  /** Runs a plan's ops on `buffer` in one native call, all of them at once through the ring. */
  async run(ops: readonly IoOp[], buffer: Uint8Array): Promise<void> {
    const records = new Float64Array(ops.length * 4);
    ops.forEach((op, i) => {
      this.checkRange(op.kind, op.offset, op.length);
      if (op.kind !== 'zero' && op.bufferOffset + op.length > buffer.length) {
        throw new CldError('EINVAL', `${op.kind} of ${op.length} bytes at buffer offset ${op.bufferOffset} overruns the ${buffer.length}-byte buffer`);
      }
      records.set([KIND[op.kind], op.offset, op.length, op.bufferOffset], i * 4);
    });
    await this.handle.run(records, buffer).catch(rethrow);
  }

  /**
   * A merge's copy, with blocking calls on a worker thread, one hand-off for the window: each
   * run in one `copy_file_range` where the file system takes it (page cache to page cache in the
   * kernel, one copy of the bytes where a read and a write make two) and no run reads what
   * another writes, as a merge's never do; otherwise its reads, then its writes. Through the ring, as run() does, ext4 hands each buffered
   * write to an io_uring worker, which runs one file's writes one at a time: a resync of about
   * 26,000 short runs copied in 1.46-1.95 s that way, in 1.20-1.25 s this way (7.3 TCG VM,
   * docs/benchmarks.md). The addon checks every run against the store and the buffer before the
   * first read, and takes `runs` as they are. Where a run's source is a hole of 256 KiB or more
   * (a discard in the snapshot punched the change area), it punches the destination instead of
   * writing the zeros the hole reads as, so the resync does not take that space again.
   */
  async copy(runs: Float64Array, buffer: Uint8Array): Promise<void> {
    if (this.closed) throw this.closedError('copy');
    let copied: Promise<void>;
    try {
      copied = this.handle.copy(runs, buffer);
    } catch (err) {
      throw asCldError(err);
    }
    await copied.catch(rethrow);
  }

  /**
   * Gives the pages of a copy buffer back to the kernel between resyncs. The resync keeps one
   * 4 MiB buffer for its life (a new one per resync stayed resident until V8's next full
   * collection), and after the first resync it held those 4 MiB for good, in every later peak of
   * the daemon's memory, whose target is 80 MiB (docs/benchmarks.md).
   */
  releaseBuffer(buffer: Uint8Array): void {
    releasePages(buffer);
  }

  /** The steps one after another on a worker thread, with blocking calls: one round trip. */
  async sequence(steps: readonly OrderedStep[]): Promise<void> {
    if (this.closed) throw this.closedError('sequence');
    for (const step of steps) if (step.kind === 'write') this.checkRange('write', step.offset, step.data.length);
    const records = new Float64Array(steps.length * 4);
    const buffer = new Uint8Array(writtenBytes(steps));
    packSteps(steps, KIND, records, 0, buffer);
    await this.handle.sequence(records, buffer).catch(rethrow);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.handle.close();
  }

  private closedError(op: string): CldError {
    return new CldError('CLDD_CLOSED', `${op} ${this.description}: the store is closed`);
  }

  private checkRange(op: string, offset: number, length: number): void {
    if (this.closed) throw this.closedError(op);
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.size) {
      throw new CldError('EINVAL', `${op} ${this.description}: ${length} bytes at ${offset} is outside 0..${this.size}`);
    }
  }
}

function rethrow(err: unknown): never {
  throw asCldError(err);
}
