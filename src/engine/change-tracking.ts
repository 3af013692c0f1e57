/**
 * Changed-block tracking: which chunks of the master were written since the last snapshot, and
 * between the one before it and the last (docs/format.md, "Changed-block tracking").
 *
 * The current period starts when snapshot E is taken (enable) and runs through snapshot,
 * resync and plain until snapshot E+1, when its set becomes the last delta (E -> E+1) and a new,
 * empty one starts. Periods alternate between the two tracking sets of the map area by the
 * parity of their snapshot number; a page counts for a period only when it was written in it.
 *
 * The invariant that makes the set never under-report: no write can become part of the master
 * after a crash unless its chunk's mark is durable. A write in place (plain, resync) may reach
 * the disk at once, so its mark is durable before it is issued: the volume asks `needsMark`
 * before planning it; when it does, `mark` records the chunks in memory and the write waits for
 * the next commit, which writes the marked pages with the map (one commit for all marks pending
 * at once). A write in a snapshot goes to the change area, where only the block's redirect makes
 * it part of the master, and every redirect of a snapshot is made in its period: the volume
 * marks the chunks in memory before it sets the redirect (when it plans the write, or for a
 * write the fast path ran, in the turn it redirects the blocks), so whichever
 * commit makes the redirect durable writes the mark too (the same commit or an earlier one;
 * commits capture marks and map pages in the same turn and run one at a time). Such a write
 * waits for nothing, and a first touch after enable costs no commit of its own. A map journal
 * replayed after a daemon died marks the chunks of the redirects it restores. `durableBits` holds only marks a completed commit
 * made durable: an executor that serves writes without the engine may serve one only when every
 * chunk it touches has its bit set there. The bits are cleared only by `startPeriod`, which the
 * volume calls under its gate (no request in flight), so a bit once seen set stays set for as
 * long as a write it admitted can run.
 */
import { CldError } from '../errors.js';
import { decodeTrackingPayload, encodeTrackingPayload, TRACKING_PAGE_HEADER, trackingPage, type Layout } from '../format/format.js';

/** Dirty tracking pages captured by a commit: map page numbers and their payloads. */
export interface CapturedMarks {
  readonly pages: number[];
  readonly payloads: Uint8Array[];
  /** Per captured page: the index of the page in the current set, and its words. */
  readonly words: { index: number; bits: Uint32Array }[];
}

export const NO_MARKS: CapturedMarks = { pages: [], payloads: [], words: [] };

/** Extents of the master, in bytes: [offset, length] pairs in order. */
export type Extent = [number, number];

export class ChangeTracking {
  /** Marks made durable by a completed commit: bit c = chunk c (word c >>> 5, bit c & 31). */
  readonly durableBits: Uint32Array;
  /** Bytes per chunk, as a power of two: chunk = floor(byte offset / 2^chunkShift) on the master. */
  readonly chunkShift: number;
  readonly chunks: number;
  /**
   * Marks made, durable or waiting for the next commit; a superset of durableBits. A queue
   * thread's map commit marks the chunks of the redirects it commits here too (an atomic OR,
   * under the map lock: native/redirector.cc), and so does mark(), which runs outside it.
   */
  readonly marked: Uint32Array;
  /** The last delta: chunks written between the previous snapshot and the last; null before snapshot 1. */
  private delta: Uint32Array | null;
  private readonly dirty = new Set<number>();
  private readonly wordsPerPage: number;
  private readonly blocksPerChunk: number;

  private constructor(
    readonly layout: Layout,
    /** The snapshot number the current set counts from. */
    private period: number,
  ) {
    this.chunkShift = layout.chunkShift;
    this.chunks = layout.chunks;
    const words = Math.ceil(layout.chunks / 32);
    this.durableBits = new Uint32Array(words);
    this.marked = new Uint32Array(words);
    this.delta = period >= 1 ? new Uint32Array(words) : null;
    this.wordsPerPage = layout.trackingBitsPerPage / 32;
    this.blocksPerChunk = 2 ** (layout.chunkShift - Math.log2(layout.blockSize));
  }

  /** Tracking for a store at snapshot `epoch`; null for a store whose format has none. */
  static forStore(layout: Layout, epoch: number): ChangeTracking | null {
    return layout.trackingPages > 0 ? new ChangeTracking(layout, epoch) : null;
  }

  /** The snapshot number the current set counts from. */
  get since(): number {
    return this.period;
  }

  /** Whether map page `page` is a tracking page (the map area holds them after the redirect pages). */
  isTrackingPage(page: number): boolean {
    return page >= this.layout.mapPages;
  }

  /**
   * Loads a tracking page found on open. A page written in the set's period holds its bits; one
   * of an earlier period counts as empty; a later period, or bits past the last chunk, is damage.
   */
  load(page: number, payload: Uint8Array): void {
    const { mapPages, trackingPages } = this.layout;
    const set = Math.floor((page - mapPages) / trackingPages);
    const index = page - mapPages - set * trackingPages;
    // Set (period & 1) holds the current period; the other one the period before it.
    const current = set === (this.period & 1);
    const wanted = current ? this.period : this.period - 1;
    const { period, bits } = decodeTrackingPayload(payload);
    if (period > this.period) {
      throw new CldError('CLDD_CORRUPT', `tracking page ${index} of set ${set} (map page ${page}) is of snapshot ${period}'s period, after the store's snapshot ${this.period}`);
    }
    if (period !== wanted || wanted < 0) return;
    const first = index * this.wordsPerPage;
    const count = Math.min(this.wordsPerPage, this.durableBits.length - first);
    const words = new Uint32Array(bits.buffer.slice(bits.byteOffset, bits.byteOffset + this.wordsPerPage * 4));
    for (let w = count; w < this.wordsPerPage; w++) {
      if (words[w] !== 0) throw this.pastEnd(page);
    }
    const lastBits = this.chunks - (this.durableBits.length - 1) * 32;
    if (first + count === this.durableBits.length && lastBits < 32 && words[count - 1] >>> lastBits !== 0) throw this.pastEnd(page);
    const target = current ? this.durableBits : this.delta;
    target!.set(words.subarray(0, count), first);
    if (current) this.marked.set(words.subarray(0, count), first);
  }

  private pastEnd(page: number): CldError {
    return new CldError('CLDD_CORRUPT', `tracking page (map page ${page}) marks chunks past the last chunk ${this.chunks - 1}`);
  }

  /** Whether a write of blocks [start, end) touches a chunk not yet durably marked. */
  needsMark(start: number, end: number): boolean {
    // Division, not >>>: block numbers pass 2^32 on a master of 16 TiB at 4 KiB blocks.
    const last = Math.floor((end - 1) / this.blocksPerChunk);
    for (let c = Math.floor(start / this.blocksPerChunk); c <= last; c++) {
      if ((this.durableBits[c >>> 5] & (1 << (c & 31))) === 0) return true;
    }
    return false;
  }

  /** Marks the chunks of blocks [start, end) in memory; the next commit makes them durable. */
  mark(start: number, end: number): void {
    const last = Math.floor((end - 1) / this.blocksPerChunk);
    for (let c = Math.floor(start / this.blocksPerChunk); c <= last; c++) {
      const w = c >>> 5;
      const bit = 1 << (c & 31);
      if (this.marked[w] & bit) continue;
      Atomics.or(this.marked, w, bit);
      this.dirty.add(Math.floor(w / this.wordsPerPage));
    }
  }

  /** Marks waiting for a commit (pages to write). */
  get pendingPages(): number {
    return this.dirty.size;
  }

  /** Takes the dirty pages of the current set as a commit writes them. */
  capture(): CapturedMarks {
    if (this.dirty.size === 0) return NO_MARKS;
    const pages: number[] = [];
    const payloads: Uint8Array[] = [];
    const words: { index: number; bits: Uint32Array }[] = [];
    const set = this.period & 1;
    for (const index of [...this.dirty].sort((a, b) => a - b)) {
      const first = index * this.wordsPerPage;
      // One copy of the marks: the payload's, whose bits committed() reads back.
      const payload = encodeTrackingPayload(this.layout, this.period, this.marked.subarray(first, first + this.wordsPerPage));
      pages.push(trackingPage(this.layout, set, index));
      payloads.push(payload);
      words.push({ index, bits: new Uint32Array(payload.buffer, payload.byteOffset + TRACKING_PAGE_HEADER, this.wordsPerPage) });
    }
    this.dirty.clear();
    return { pages, payloads, words };
  }

  /** The captured pages are durable (their commit completed): their marks admit writes now. */
  committed(marks: CapturedMarks): void {
    for (const { index, bits } of marks.words) {
      const first = index * this.wordsPerPage;
      const count = Math.min(this.wordsPerPage, this.durableBits.length - first);
      for (let w = 0; w < count; w++) this.durableBits[first + w] |= bits[w];
    }
  }

  /**
   * Snapshot `epoch` was taken: the current set becomes the last delta and an empty one starts.
   * Called under the volume's gate with every mark durable (the drain's commit wrote them).
   */
  startPeriod(epoch: number): void {
    if (this.dirty.size > 0) throw new Error('tracking: a period starts with marks not yet committed');
    this.delta ??= new Uint32Array(this.durableBits.length);
    this.delta.set(this.durableBits);
    this.durableBits.fill(0);
    this.marked.fill(0);
    this.period = epoch;
  }

  /** Bytes of the master in chunks changed since the current period's snapshot (so far). */
  get changedBytes(): number {
    return this.bytesOf(this.marked);
  }

  /** Bytes in the last delta's chunks; null before the first snapshot. */
  get deltaBytes(): number | null {
    return this.delta ? this.bytesOf(this.delta) : null;
  }

  /**
   * What changed on the master between snapshot `from` and the current period's snapshot, as
   * byte extents (whole chunks, the last one cut at the end of the master); null when that is
   * not kept (only the last delta is): the caller must take everything as changed.
   */
  changesSince(from: number): Extent[] | null {
    if (from === this.period) return [];
    if (from === this.period - 1 && this.delta) return this.extentsOf(this.delta);
    return null;
  }

  /** The current set as byte extents: everything written since the current period's snapshot. */
  changedExtents(): Extent[] {
    return this.extentsOf(this.marked);
  }

  /** The last delta as byte extents; null before the first snapshot. */
  deltaExtents(): Extent[] | null {
    return this.delta && this.extentsOf(this.delta);
  }

  private extentsOf(bits: Uint32Array): Extent[] {
    const out: Extent[] = [];
    const capacity = this.layout.blocks * this.layout.blockSize;
    const size = 2 ** this.chunkShift;
    let c = 0;
    while (c < this.chunks) {
      const w = c >>> 5;
      if (bits[w] === 0 && (c & 31) === 0) {
        c += 32;
        continue;
      }
      if ((bits[w] & (1 << (c & 31))) === 0) {
        c++;
        continue;
      }
      let e = c + 1;
      while (e < this.chunks && bits[e >>> 5] & (1 << (e & 31))) e++;
      const offset = c * size;
      out.push([offset, Math.min(e * size, capacity) - offset]);
      c = e;
    }
    return out;
  }

  /** Bytes in the chunks set in `bits` (the last chunk counts up to the end of the master). */
  private bytesOf(bits: Uint32Array): number {
    let chunks = 0;
    for (let w = 0; w < bits.length; w++) {
      let x = bits[w];
      while (x) {
        x &= x - 1;
        chunks++;
      }
    }
    const size = 2 ** this.chunkShift;
    const last = this.chunks - 1;
    const overhang = this.chunks * size - this.layout.blocks * this.layout.blockSize;
    return chunks * size - (bits[last >>> 5] & (1 << (last & 31)) ? overhang : 0);
  }

  /** Bytes of memory the sets hold. */
  get residentBytes(): number {
    return this.durableBits.byteLength + this.marked.byteLength + (this.delta?.byteLength ?? 0);
  }
}
