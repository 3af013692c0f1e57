import { CldError } from '../errors.js';
import { MAP_SLOT_HEADER } from '../format/format.js';
import { releasePages } from '../io/pages.js';

/**
 * The redirect bitmap in memory: bit b set means block b of the master lives in the change area.
 * Paged like the on-disk map (one page per map slot payload); an all-zero page holds no memory,
 * so a plain volume of any size costs almost nothing and a 1 TiB area at 4 KiB blocks costs at
 * most 34 MB. Pages whose bits changed since the last commit are marked dirty.
 *
 * The bits live in one flat array, `bits` (block b is bit b & 31 of word b >>> 5), that the
 * native queue threads read to serve requests without the engine (docs/serving.md); each page is
 * a view of it. A page that was never set costs address space only (the allocator hands out
 * untouched zero pages), and releaseIfEmpty gives the memory back once no bit is set.
 */
export class BlockMap {
  readonly pageCount: number;
  readonly bitsPerPage: number;
  private readonly wordsPerPage: number;
  /** Every page's words, back to back; a page never set is all zero. */
  readonly bits: Uint32Array;
  /** A page's view of `bits`, or null while the page is all zero. */
  private readonly pages: (Uint32Array | null)[];
  private readonly pageCounts: Uint32Array;
  private readonly dirtyFlags: Uint8Array;
  private dirtyList: number[] = [];
  private setCount = 0;

  constructor(
    readonly blocks: number,
    blockSize: number,
  ) {
    this.bitsPerPage = (blockSize - MAP_SLOT_HEADER) * 8;
    this.wordsPerPage = this.bitsPerPage / 32;
    this.pageCount = Math.ceil(blocks / this.bitsPerPage);
    this.bits = new Uint32Array(this.pageCount * this.wordsPerPage);
    this.pages = new Array(this.pageCount).fill(null);
    this.pageCounts = new Uint32Array(this.pageCount);
    this.dirtyFlags = new Uint8Array(this.pageCount);
  }

  /**
   * Gives the memory of the bits back once none is set (a resync that finished). Pages cleared
   * one by one drop their views but keep their memory: after a snapshot and its resync the
   * daemon held the whole bitmap it had touched (a 1 TiB area all redirected: 33.5 MB) for good.
   */
  releaseIfEmpty(): void {
    if (this.setCount === 0) releasePages(new Uint8Array(this.bits.buffer));
  }

  /** Number of redirected blocks. */
  get count(): number {
    return this.setCount;
  }

  get dirtyPages(): number {
    return this.dirtyList.length;
  }

  /** Bytes held by allocated pages. */
  get residentBytes(): number {
    let n = 0;
    for (const p of this.pages) if (p) n += p.byteLength;
    return n;
  }

  test(block: number): boolean {
    const page = this.pages[Math.floor(block / this.bitsPerPage)];
    if (!page) return false;
    const bit = block % this.bitsPerPage;
    return (page[bit >>> 5] & (1 << (bit & 31))) !== 0;
  }

  /** Sets or clears bits [start, end); marks changed pages dirty. */
  assign(start: number, end: number, value: boolean): void {
    let b = start;
    while (b < end) {
      const p = Math.floor(b / this.bitsPerPage);
      const pageStart = p * this.bitsPerPage;
      const stop = Math.min(end, pageStart + this.bitsPerPage);
      let page = this.pages[p];
      if (!page) {
        if (!value) {
          b = stop;
          continue;
        }
        page = this.pages[p] = this.pageWords(p);
      }
      let changed = 0;
      for (let bit = b - pageStart; bit < stop - pageStart; ) {
        const w = bit >>> 5;
        const lo = bit & 31;
        const hi = Math.min(32, lo + (stop - pageStart - bit));
        const mask = hi - lo === 32 ? 0xffffffff : (((1 << (hi - lo)) - 1) << lo) >>> 0;
        // Read-modify-write in one: a queue thread may set other bits of the word meanwhile
        // (native/redirector.cc). Sequentially consistent, after the engine raised
        // commitPending: a queue thread that reads the new bits and then fences reads
        // commitPending raised too (the fast FUA write, native/serving.cc).
        const old = (value ? Atomics.or(page, w, mask) : Atomics.and(page, w, ~mask)) >>> 0;
        const next = value ? (old | mask) >>> 0 : (old & ~mask) >>> 0;
        if (next !== old) changed += popcount((old ^ next) >>> 0);
        bit += hi - lo;
      }
      if (changed) {
        if (value) {
          this.pageCounts[p] += changed;
          this.setCount += changed;
        } else {
          this.pageCounts[p] -= changed;
          this.setCount -= changed;
          if (this.pageCounts[p] === 0) this.pages[p] = null;
        }
        this.markDirty(p);
      }
      b = stop;
    }
  }

  /**
   * Takes bits queue threads set (native/redirector.cc) into the bookkeeping: `ranges` holds
   * (start, end, set, captured) from index `at` on, `set` being how many of [start, end) were
   * clear before (the thread counted them from its atomic ORs; the engine changes bits only under
   * the same lock, so no change is counted twice). Their pages are marked dirty, unless a queue
   * thread's map commit holds the range (`captured`): that commit writes the page. A range across
   * two pages is rare (a request spans at most 128 blocks): those pages are recounted, after the
   * rest, so the recount is the truth. Recounting every range's page instead took the main thread
   * 27 µs a first touch (3.4 s of CPU in an 8 s job at QD32 in the 6.12 VM, where the queue
   * thread took 26 µs), competing with the queue thread and fio for the VM's two CPUs.
   */
  absorb(ranges: Float64Array, at: number): void {
    const recount = new Map<number, boolean>();
    for (let i = at; i + 3 < ranges.length; i += 4) {
      const first = Math.floor(ranges[i] / this.bitsPerPage);
      const last = Math.floor((ranges[i + 1] - 1) / this.bitsPerPage);
      const dirty = ranges[i + 3] === 0;
      if (first !== last) {
        for (let p = first; p <= last; p++) recount.set(p, (recount.get(p) ?? false) || dirty);
        continue;
      }
      this.pageCounts[first] += ranges[i + 2];
      this.setCount += ranges[i + 2];
      if (this.pageCounts[first] > 0) this.pages[first] ??= this.pageWords(first);
      if (dirty) this.markDirty(first);
    }
    for (const [p, dirty] of recount) {
      const words = this.pageWords(p);
      let n = 0;
      for (let w = 0; w < words.length; w++) if (words[w]) n += popcount(words[w]);
      this.setCount += n - this.pageCounts[p];
      this.pageCounts[p] = n;
      this.pages[p] = n ? words : null;
      if (dirty) this.markDirty(p);
    }
  }

  /**
   * Calls `visit(start, end, redirected)` for each maximal run of equal bits in [start, end),
   * until it returns false.
   */
  forEachRun(start: number, end: number, visit: (start: number, end: number, redirected: boolean) => void | boolean): void {
    let runStart = start;
    let runValue = this.test(start);
    let b = start;
    while (b < end) {
      const p = Math.floor(b / this.bitsPerPage);
      const pageEnd = Math.min(end, (p + 1) * this.bitsPerPage);
      const page = this.pages[p];
      if (!page) {
        if (runValue) {
          if (visit(runStart, b, true) === false) return;
          runStart = b;
          runValue = false;
        }
        b = pageEnd;
        continue;
      }
      const base = p * this.bitsPerPage;
      while (b < pageEnd) {
        // A word at a time: the bits from b on in b's word that differ from the run, and the
        // lowest of them ends it. Bit by bit, the runs of scattered first touches (a mixed word
        // nearly everywhere) cost a resync's window about 1,000 steps instead of 200-odd.
        const bit = b - base;
        const w = bit >>> 5;
        const differ = (runValue ? ~page[w] : page[w]) & (0xffffffff << (bit & 31));
        if (differ === 0) {
          b = Math.min(pageEnd, base + (w + 1) * 32);
          continue;
        }
        const next = base + w * 32 + lowestBit(differ);
        if (next >= pageEnd) {
          b = pageEnd;
          break;
        }
        if (visit(runStart, next, runValue) === false) return;
        runStart = next;
        runValue = !runValue;
        b = next;
      }
    }
    visit(runStart, end, runValue);
  }

  /**
   * The end of a window from `start` to at most `limit` that holds at most `maxSet` redirected
   * blocks: right after the last one it takes (a run may be cut), or `start` when it takes none.
   */
  windowEnd(start: number, limit: number, maxSet: number): number {
    let end = start;
    let left = maxSet;
    this.forEachRun(start, Math.min(limit, this.blocks), (s, e, redirected) => {
      if (!redirected) return true;
      const take = Math.min(e - s, left);
      end = s + take;
      left -= take;
      return left > 0;
    });
    return end;
  }

  /** The first redirected block at or after `from`, or -1. */
  nextSet(from: number): number {
    for (let p = Math.floor(from / this.bitsPerPage); p < this.pageCount; p++) {
      const page = this.pages[p];
      if (!page) continue;
      const base = p * this.bitsPerPage;
      let bit = Math.max(0, from - base);
      while (bit < this.bitsPerPage) {
        const w = bit >>> 5;
        const word = (page[w] >>> (bit & 31)) << (bit & 31);
        if (word !== 0) {
          const found = base + w * 32 + (31 - Math.clz32(word & -word));
          return found < this.blocks ? found : -1;
        }
        bit = (w + 1) * 32;
      }
    }
    return -1;
  }

  /**
   * The page's payload as it would be stored, or null when the page is all zero: a view of the
   * bitmap, which changes with it, so a commit encodes it under the map lock (commit.ts).
   */
  payload(p: number): Uint8Array | null {
    const page = this.pages[p];
    return page ? new Uint8Array(page.buffer, page.byteOffset, page.byteLength) : null;
  }

  private pageWords(p: number): Uint32Array {
    return this.bits.subarray(p * this.wordsPerPage, (p + 1) * this.wordsPerPage);
  }

  /** Loads a page's stored payload; rejects bits beyond the last block. */
  load(p: number, payload: Uint8Array): void {
    if (payload.length < this.wordsPerPage * 4) {
      throw new CldError('CLDD_CORRUPT', `map page ${p}: payload of ${payload.length} bytes, expected ${this.wordsPerPage * 4}`);
    }
    const words = new Uint32Array(payload.buffer.slice(payload.byteOffset, payload.byteOffset + this.wordsPerPage * 4));
    let n = 0;
    for (let w = 0; w < words.length; w++) if (words[w]) n += popcount(words[w]);
    const base = p * this.bitsPerPage;
    if (n > 0 && base + this.bitsPerPage > this.blocks) {
      for (let bit = this.blocks - base; bit < this.bitsPerPage; bit++) {
        if (words[bit >>> 5] & (1 << (bit & 31))) {
          throw new CldError('CLDD_CORRUPT', `map page ${p} marks block ${base + bit}, beyond the last block ${this.blocks - 1}`);
        }
      }
    }
    this.setCount += n - this.pageCounts[p];
    this.pageCounts[p] = n;
    const page = this.pageWords(p);
    page.set(words);
    this.pages[p] = n ? page : null;
  }

  /** Takes the list of dirty pages and marks them clean. */
  takeDirty(): number[] {
    const list = this.dirtyList;
    this.dirtyList = [];
    for (const p of list) this.dirtyFlags[p] = 0;
    return list.sort((a, b) => a - b);
  }

  markDirty(p: number): void {
    if (!this.dirtyFlags[p]) {
      this.dirtyFlags[p] = 1;
      this.dirtyList.push(p);
    }
  }
}

function popcount(x: number): number {
  x -= (x >>> 1) & 0x55555555;
  x = (x & 0x33333333) + ((x >>> 2) & 0x33333333);
  x = (x + (x >>> 4)) & 0x0f0f0f0f;
  return Math.imul(x, 0x01010101) >>> 24;
}

if (new Uint8Array(new Uint32Array([1]).buffer)[0] !== 1) {
  throw new Error('cldd stores its map little-endian and runs only on little-endian machines');
}

/** The index of the lowest set bit of a non-zero 32-bit word. */
function lowestBit(word: number): number {
  return 31 - Math.clz32(word & -word);
}
