import type { VolumeState } from '../../src/format/format.js';
import { SECTOR } from './stamp.js';

interface Pending {
  version: number;
  /** Completion order; Infinity while the write is in flight (it may still land after a crash). */
  seq: number;
}

/**
 * The reference model of a cldd pair, per 512-byte sector of the master:
 *  - `current`: what a read must return now (the last completed write);
 *  - `stable`: what a crash can no longer take away (covered by a completed flush or FUA);
 *  - `pending`: versions written since, any of which a crash may leave behind, sector by sector;
 *  - `slave`: the enable-time image, which must never change while the slave exists.
 */
export class ReferenceModel {
  readonly sectorsPerBlock: number;
  readonly sectors: number;
  readonly current: Int32Array;
  readonly stable: Int32Array;
  private pending = new Map<number, Pending[]>();
  private completed = 0;
  slave: Int32Array | null = null;
  /** The states the superblock may hold if the power went off now. */
  durableStates = new Set<VolumeState>(['plain']);
  /** Blocks ever written, for verifying large volumes partially. */
  readonly touched = new Set<number>();

  constructor(
    readonly blocks: number,
    readonly blockSize: number,
  ) {
    this.sectorsPerBlock = blockSize / SECTOR;
    this.sectors = blocks * this.sectorsPerBlock;
    this.current = new Int32Array(this.sectors);
    this.stable = new Int32Array(this.sectors);
  }

  /** A write (or discard: version 0) of blocks [start, end) was issued. */
  issue(start: number, end: number, version: number): Pending {
    const entry: Pending = { version, seq: Infinity };
    for (let b = start; b < end; b++) {
      this.touched.add(b);
      for (let s = b * this.sectorsPerBlock; s < (b + 1) * this.sectorsPerBlock; s++) {
        let list = this.pending.get(s);
        if (!list) this.pending.set(s, (list = []));
        list.push(entry);
      }
    }
    return entry;
  }

  /** The write completed: reads now return it. With FUA it is stable too. */
  complete(entry: Pending, start: number, end: number, fua: boolean): void {
    entry.seq = ++this.completed;
    const first = start * this.sectorsPerBlock;
    const last = end * this.sectorsPerBlock;
    this.current.fill(entry.version, first, last);
    if (fua) {
      for (let s = first; s < last; s++) this.settle(s, entry.seq);
    }
  }

  /** A flush was issued: it covers the writes completed so far. */
  flushIssued(): number {
    return this.completed;
  }

  flushCompleted(cover: number): void {
    for (const s of [...this.pending.keys()]) this.settle(s, cover);
  }

  private settle(sector: number, cover: number): void {
    const list = this.pending.get(sector);
    if (!list) return;
    let newest: Pending | null = null;
    for (const p of list) if (p.seq <= cover && (!newest || p.seq > newest.seq)) newest = p;
    if (newest) this.stable[sector] = newest.version;
    const rest = list.filter((p) => p.seq > cover);
    if (rest.length) this.pending.set(sector, rest);
    else this.pending.delete(sector);
  }

  /** Versions a sector may hold after a crash. */
  candidates(sector: number): number[] {
    const list = this.pending.get(sector);
    return list ? [this.stable[sector], ...list.map((p) => p.version)] : [this.stable[sector]];
  }

  /** After a crash: what was read back is the new truth, and durable. */
  adopt(observed: Int32Array, firstSector = 0): void {
    this.current.set(observed, firstSector);
    this.stable.set(observed, firstSector);
  }

  resetPending(): void {
    this.pending.clear();
  }

  /** Everything current is durable (after enable, disable or a flush with nothing concurrent). */
  settleAll(): void {
    this.stable.set(this.current);
    this.pending.clear();
  }
}
