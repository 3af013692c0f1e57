import { CldError } from '../../src/errors.js';
import type { BlockStore } from '../../src/io/block-store.js';
import { SECTOR } from '../../src/io/block-store.js';
import { MemoryStore } from '../../src/io/memory-store.js';

/** A write that completed but is not yet durable. `data` null means zeros. */
interface VolatileWrite {
  offset: number;
  length: number;
  data: Uint8Array | null;
}

export type FaultOp = 'read' | 'write' | 'zero' | 'flush';

export interface FaultStoreOptions {
  /** Random source in [0, 1); completion order and crash outcomes come from it. */
  random?: () => number;
  /** Largest number of event-loop turns an operation may take to complete (0: complete at once). */
  maxLatency?: number;
  /**
   * Below this byte offset a torn write may also leave one sector half-written (garbage), as a
   * drive losing power mid-sector can. Tests set it to the end of the metadata region, where
   * checksums must catch it; above it, sectors are atomic so data versions stay identifiable.
   */
  scrambleBelow?: number;
}

/** What happened to the unsynced writes when the power went off. */
export interface CrashReport {
  dropped: number;
  applied: number;
  torn: number;
}

/**
 * A store with a volatile write cache that can lose power. Reads see every completed write;
 * flush() makes the writes that completed before it durable; crash() returns the durable image
 * with each unsynced write dropped, applied or torn (a random subset of its 512-byte sectors),
 * applied in a random order — so a crash can land between any two writes, and inside one.
 *
 * Operations complete after a random number of event-loop turns, so concurrent requests finish
 * out of order and a flush covers only what completed before it was issued, as on a real disk.
 */
export class FaultStore implements BlockStore {
  readonly description = 'fault-injecting memory';
  readonly size: number;
  private readonly durable: MemoryStore;
  private readonly visible: MemoryStore;
  private unsynced: VolatileWrite[] = [];
  /** Writes taken by flushes still running, one batch per flush, oldest first. */
  private flushing: VolatileWrite[][] = [];
  private readonly inFlight = new Set<VolatileWrite>();
  private readonly random: () => number;
  private readonly maxLatency: number;
  private readonly scrambleBelow: number;
  private powerOffCountdown = Infinity;
  private off = false;
  private failure: ((op: FaultOp, offset: number, length: number) => boolean) | null = null;
  /** Mutating operations issued so far (writes, zeroes, flushes). */
  mutations = 0;

  constructor(image: MemoryStore, options: FaultStoreOptions = {}) {
    this.size = image.size;
    this.durable = image;
    this.visible = MemoryStore.copyOf(image);
    this.random = options.random ?? Math.random;
    this.maxLatency = options.maxLatency ?? 0;
    this.scrambleBelow = options.scrambleBelow ?? 0;
  }

  get poweredOff(): boolean {
    return this.off;
  }

  /** The power goes off when the n-th mutating operation from now is issued (it is interrupted). */
  powerOffAfter(n: number): void {
    this.powerOffCountdown = n;
  }

  /** Fails matching operations with EIO (they have no effect). Pass null to stop. */
  failWhen(predicate: ((op: FaultOp, offset: number, length: number) => boolean) | null): void {
    this.failure = predicate;
  }

  async read(buffer: Uint8Array, offset: number): Promise<void> {
    this.enter('read', offset, buffer.length, false);
    await this.latency();
    this.checkPower();
    this.visible.readSync(buffer, offset);
  }

  async write(data: Uint8Array, offset: number): Promise<void> {
    await this.mutate('write', offset, data.length, data.slice());
  }

  async zero(offset: number, length: number): Promise<void> {
    await this.mutate('zero', offset, length, null);
  }

  async flush(): Promise<void> {
    this.enter('flush', 0, 0, true);
    const covered = this.unsynced;
    this.unsynced = [];
    this.flushing.push(covered);
    await this.latency();
    // Powered off: the batch stays in `flushing`, where crash() finds it.
    if (this.off) throw powerOff();
    // Writes taken by earlier flushes completed before this one was issued: they are covered too.
    const upTo = this.flushing.indexOf(covered);
    for (const batch of this.flushing.splice(0, upTo + 1)) for (const w of batch) apply(this.durable, w, null);
  }

  async close(): Promise<void> {}

  /**
   * Takes the image the store would hold after losing power now: every unsynced or interrupted
   * write is dropped, applied or torn. With `worst`, every unsynced write below scrambleBelow is
   * garbage and every other one is lost. The store itself is left powered off.
   */
  crash(options: { worst?: boolean } = {}): { image: MemoryStore; report: CrashReport } {
    this.off = true;
    const pending = [...this.flushing.flat(), ...this.unsynced, ...this.inFlight];
    this.inFlight.clear();
    this.unsynced = [];
    this.flushing = [];
    const image = MemoryStore.copyOf(this.durable);
    const report: CrashReport = { dropped: 0, applied: 0, torn: 0 };
    const order = pending.map((w) => ({ w, key: this.random() })).sort((a, b) => a.key - b.key);
    for (const { w } of order) {
      if (options.worst) {
        // The worst a drive can do: metadata writes in flight are garbage, data writes are lost.
        if (w.offset < this.scrambleBelow) {
          const end = Math.min(w.offset + w.length, this.scrambleBelow);
          const garbage = new Uint8Array(end - w.offset);
          for (let i = 0; i < garbage.length; i++) garbage[i] = Math.floor(this.random() * 256);
          image.writeSync(garbage, w.offset);
          report.torn++;
        } else report.dropped++;
        continue;
      }
      const r = this.random();
      if (r < 0.35) {
        report.dropped++;
      } else if (r < 0.7) {
        apply(image, w, null);
        report.applied++;
      } else {
        const sectors = Math.ceil(w.length / SECTOR);
        const keep = new Uint8Array(sectors);
        for (let i = 0; i < sectors; i++) keep[i] = this.random() < 0.5 ? 1 : 0;
        apply(image, w, keep);
        if (w.offset < this.scrambleBelow && this.random() < 0.5) {
          // Only sectors below the limit may be garbled.
          const below = Math.min(sectors, Math.ceil((this.scrambleBelow - w.offset) / SECTOR));
          const s = Math.floor(this.random() * below);
          const at = w.offset + s * SECTOR;
          const garbage = new Uint8Array(Math.min(SECTOR, this.scrambleBelow - at, w.offset + w.length - at));
          for (let i = 0; i < garbage.length; i++) garbage[i] = Math.floor(this.random() * 256);
          if (garbage.length > 0) image.writeSync(garbage, at);
        }
        report.torn++;
      }
    }
    return { image, report };
  }

  private async mutate(op: 'write' | 'zero', offset: number, length: number, data: Uint8Array | null): Promise<void> {
    const w: VolatileWrite = { offset, length, data };
    this.enter(op, offset, length, true, w);
    this.inFlight.add(w);
    await this.latency();
    if (!this.inFlight.delete(w)) throw powerOff(); // the power went off while it was in flight
    apply(this.visible, w, null);
    this.unsynced.push(w);
  }

  private enter(op: FaultOp, offset: number, length: number, mutating: boolean, interrupted?: VolatileWrite): void {
    this.checkPower();
    if (offset < 0 || offset + length > this.size) {
      throw new CldError('EINVAL', `fault store: ${op} of ${length} bytes at ${offset} is outside 0..${this.size}`);
    }
    if (this.failure?.(op, offset, length)) {
      throw new CldError('EIO', `fault store: injected I/O error on ${op} at ${offset}`);
    }
    if (mutating) {
      this.mutations++;
      if (--this.powerOffCountdown <= 0) {
        this.off = true;
        if (interrupted) this.unsynced.push(interrupted);
        throw powerOff();
      }
    }
  }

  private checkPower(): void {
    if (this.off) throw powerOff();
  }

  private async latency(): Promise<void> {
    if (this.maxLatency <= 0) return;
    const turns = Math.floor(this.random() * (this.maxLatency + 1));
    for (let i = 0; i < turns; i++) await new Promise<void>((resolve) => setImmediate(resolve));
  }
}

function powerOff(): CldError {
  return new CldError('EIO', 'fault store: the power is off');
}

/** Applies a write to an image, whole or (with `keep`) only the sectors marked 1. */
function apply(image: MemoryStore, w: VolatileWrite, keep: Uint8Array | null): void {
  if (!keep) {
    if (w.data) image.writeSync(w.data, w.offset);
    else image.zeroSync(w.offset, w.length);
    return;
  }
  for (let s = 0; s < keep.length; s++) {
    if (!keep[s]) continue;
    const start = s * SECTOR;
    const end = Math.min(w.length, start + SECTOR);
    if (w.data) image.writeSync(w.data.subarray(start, end), w.offset + start);
    else image.zeroSync(w.offset + start, end - start);
  }
}
