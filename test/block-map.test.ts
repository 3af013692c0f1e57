/**
 * The in-memory redirect bitmap, against a naive bit array: bits across word and page
 * boundaries, maximal runs, payload round trips, dirty tracking and memory use.
 */
import { readFileSync } from 'node:fs';
import { describe, expect, test } from 'vitest';
import { CldError } from '../src/errors.js';
import { BlockMap } from '../src/engine/block-map.js';
import { MAP_SLOT_HEADER } from '../src/format/format.js';
import { between, rng, seedFromEnv } from './support/random.js';

const BITS_4K = (4096 - MAP_SLOT_HEADER) * 8; // 32256 bits per page at 4 KiB

type Run = [number, number, boolean];

/** The end of a window from `start` below `limit` holding at most `most` set bits, as BlockMap.windowEnd. */
function naiveWindowEnd(bits: Uint8Array, start: number, limit: number, most: number): number {
  let end = start;
  for (let b = start, taken = 0; b < Math.min(limit, bits.length) && taken < most; b++) {
    if (bits[b]) {
      taken++;
      end = b + 1;
    }
  }
  return end;
}

function runsOf(map: BlockMap, start: number, end: number): Run[] {
  const runs: Run[] = [];
  map.forEachRun(start, end, (s, e, v) => {
    runs.push([s, e, v]);
  });
  return runs;
}

function naiveRuns(bits: Uint8Array, start: number, end: number): Run[] {
  const runs: Run[] = [];
  let s = start;
  for (let b = start + 1; b <= end; b++) {
    if (b === end || bits[b] !== bits[s]) {
      runs.push([s, b, bits[s] === 1]);
      s = b;
    }
  }
  return runs;
}

function expectMatches(map: BlockMap, bits: Uint8Array, what: string): void {
  let count = 0;
  for (let b = 0; b < bits.length; b++) {
    if (map.test(b) !== (bits[b] === 1)) throw new Error(`${what}: bit ${b} is ${map.test(b)}, expected ${bits[b] === 1}`);
    count += bits[b];
  }
  expect(map.count, what).toBe(count);
}

describe('BlockMap', () => {
  test('bits a queue thread set are taken with the counts it reports, across pages too', () => {
    const seed = seedFromEnv();
    console.log(`absorb seed: ${seed} (replay with CLDD_SEED=${seed})`);
    const random = rng(seed);
    const map = new BlockMap(3 * BITS_4K, 4096);
    const naive = new Uint8Array(map.blocks);
    for (let round = 0; round < 40; round++) {
      // The engine's own changes, between the threads' batches.
      const s = between(random, 0, map.blocks - 200);
      const e = s + between(random, 1, 200);
      map.assign(s, e, true);
      naive.fill(1, s, e);
      map.takeDirty();
      // A batch as native/redirector.cc leaves it: bits ORed in, each range's newly set count.
      const held: number[] = [0];
      for (let k = between(random, 1, 30); k > 0; k--) {
        // Near a page boundary a third of the time.
        const start = random() < 0.33 ? between(random, 1, 2) * BITS_4K - between(random, 1, 100) : between(random, 0, map.blocks - 128);
        const end = Math.min(map.blocks, start + between(random, 1, 128));
        let set = 0;
        for (let b = start; b < end; b++) {
          const before = map.bits[b >>> 5];
          map.bits[b >>> 5] = (before | (1 << (b & 31))) >>> 0;
          if (map.bits[b >>> 5] !== before) set++;
        }
        naive.fill(1, start, end);
        // A third of them held by a queue thread's map commit: their pages stay clean.
        held.push(start, end, set, random() < 0.33 ? 1 : 0);
      }
      map.absorb(Float64Array.from(held), 1);
      expect(map.count).toBe(naive.reduce((a, b) => a + b, 0));
      for (let b = 0; b < map.blocks; b += 97) expect(map.test(b), `block ${b}`).toBe(naive[b] === 1);
      const touched = new Set<number>();
      for (let i = 1; i < held.length; i += 4) {
        if (held[i + 3] === 0) for (let p = Math.floor(held[i] / BITS_4K); p <= Math.floor((held[i + 1] - 1) / BITS_4K); p++) touched.add(p);
      }
      expect(map.takeDirty()).toEqual([...touched].sort((a, b) => a - b));
    }
  });

  test('assign_test_and_count_across_word_and_page_boundaries', () => {
    const blocks = 3 * BITS_4K + 100;
    const map = new BlockMap(blocks, 4096);
    expect(map.pageCount).toBe(4);
    expect(map.bitsPerPage).toBe(BITS_4K);
    const ranges: [number, number][] = [
      [0, 1],
      [31, 33], // word boundary
      [63, 64],
      [64, 96], // one whole word
      [BITS_4K - 5, BITS_4K + 5], // page boundary
      [2 * BITS_4K - 1, 3 * BITS_4K + 1], // a whole page and a bit each side
      [blocks - 1, blocks], // the last block
    ];
    const bits = new Uint8Array(blocks);
    for (const [s, e] of ranges) {
      map.assign(s, e, true);
      bits.fill(1, s, e);
    }
    expectMatches(map, bits, 'after setting');
    // Setting again changes nothing.
    const count = map.count;
    map.assign(31, 33, true);
    expect(map.count).toBe(count);
    // Clear a range spanning a page boundary, partly set and partly clear.
    map.assign(BITS_4K - 40, BITS_4K + 2, false);
    bits.fill(0, BITS_4K - 40, BITS_4K + 2);
    map.assign(2 * BITS_4K + 7, 2 * BITS_4K + 70, false);
    bits.fill(0, 2 * BITS_4K + 7, 2 * BITS_4K + 70);
    expectMatches(map, bits, 'after clearing');
    expect(map.nextSet(BITS_4K - 40)).toBe(BITS_4K + 2);
  });

  test('forEachRun_tiles_the_range_with_maximal_runs_under_random_operations', () => {
    const seed = seedFromEnv();
    console.log(`block map seed: ${seed} (replay with CLDD_SEED=${seed})`);
    const random = rng(seed);
    for (const blockSize of [4096, 8192]) {
      const bitsPerPage = (blockSize - MAP_SLOT_HEADER) * 8;
      const blocks = 2 * bitsPerPage + between(random, 1, 3000);
      const map = new BlockMap(blocks, blockSize);
      const bits = new Uint8Array(blocks);
      // Operations cluster around page and word boundaries, where the fast paths are.
      const hotSpots = [0, 32, bitsPerPage, 2 * bitsPerPage, blocks];
      const position = () => {
        const base = hotSpots[Math.floor(random() * hotSpots.length)];
        return Math.max(0, Math.min(blocks - 1, base + between(random, -80, 80)));
      };
      for (let i = 0; i < 1000; i++) {
        const s = random() < 0.9 ? position() : between(random, 0, blocks - 1);
        const e = Math.min(blocks, s + 1 + (random() < 0.8 ? between(random, 0, 100) : between(random, 0, bitsPerPage)));
        const value = random() < 0.55;
        map.assign(s, e, value);
        bits.fill(value ? 1 : 0, s, e);
        const qs = random() < 0.5 ? position() : between(random, 0, blocks - 1);
        const qe = Math.min(blocks, qs + between(random, 1, random() < 0.7 ? 200 : blocks));
        const got = runsOf(map, qs, qe);
        const want = naiveRuns(bits, qs, qe);
        if (JSON.stringify(got) !== JSON.stringify(want)) {
          throw new Error(`[seed ${seed}] op ${i}: runs of [${qs}, ${qe}) are ${JSON.stringify(got)}, expected ${JSON.stringify(want)}`);
        }
        // nextSet and windowEnd agree with the naive array.
        const from = between(random, 0, blocks - 1);
        const next = bits.indexOf(1, from);
        expect(map.nextSet(from), `[seed ${seed}] nextSet(${from})`).toBe(next);
        const limit = between(random, from, blocks + 8);
        const most = between(random, 1, random() < 0.5 ? 8 : 400);
        expect(map.windowEnd(from, limit, most), `[seed ${seed}] windowEnd(${from}, ${limit}, ${most})`).toBe(naiveWindowEnd(bits, from, limit, most));
      }
      expectMatches(map, bits, `[seed ${seed}] block size ${blockSize}`);
      const all = runsOf(map, 0, blocks);
      expect(all).toEqual(naiveRuns(bits, 0, blocks));
    }
  });

  test('forEachRun_over_scattered_bits_as_random_first_touches_leave_them', () => {
    // A merge window after random 4 KiB first touches: a run every few bits, across words and
    // a page boundary, queried from every kind of start and end within a word.
    const seed = seedFromEnv();
    console.log(`scattered runs seed: ${seed} (replay with CLDD_SEED=${seed})`);
    const random = rng(seed);
    const blocks = 2 * BITS_4K + 500;
    const map = new BlockMap(blocks, 4096);
    const bits = new Uint8Array(blocks);
    for (const density of [0.05, 0.6, 0.97]) {
      map.assign(0, blocks, false);
      bits.fill(0);
      for (let b = BITS_4K - 3000; b < blocks; b++) {
        if (random() < density) {
          map.assign(b, b + 1, true);
          bits[b] = 1;
        }
      }
      for (let i = 0; i < 300; i++) {
        const qs = between(random, BITS_4K - 3100, blocks - 1);
        const qe = Math.min(blocks, qs + between(random, 1, 4000));
        const got = runsOf(map, qs, qe);
        const want = naiveRuns(bits, qs, qe);
        if (JSON.stringify(got) !== JSON.stringify(want)) {
          throw new Error(`[seed ${seed}] density ${density}: runs of [${qs}, ${qe}) are ${JSON.stringify(got)}, expected ${JSON.stringify(want)}`);
        }
      }
    }
  });

  test('runs_are_maximal_over_long_equal_stretches', () => {
    const map = new BlockMap(3 * BITS_4K, 4096);
    map.assign(10, 2 * BITS_4K + 10, true);
    expect(runsOf(map, 0, 3 * BITS_4K)).toEqual([
      [0, 10, false],
      [10, 2 * BITS_4K + 10, true],
      [2 * BITS_4K + 10, 3 * BITS_4K, false],
    ]);
    // A run that ends on an empty (unallocated) page.
    map.assign(BITS_4K, 3 * BITS_4K, false);
    expect(runsOf(map, 5, 3 * BITS_4K)).toEqual([
      [5, 10, false],
      [10, BITS_4K, true],
      [BITS_4K, 3 * BITS_4K, false],
    ]);
    const empty = new BlockMap(3 * BITS_4K, 4096);
    expect(runsOf(empty, 0, 3 * BITS_4K)).toEqual([[0, 3 * BITS_4K, false]]);
  });

  test('nextSet_and_windowEnd_at_the_edges', () => {
    const blocks = BITS_4K + 50;
    const map = new BlockMap(blocks, 4096);
    expect(map.nextSet(0)).toBe(-1);
    map.assign(blocks - 1, blocks, true);
    expect(map.nextSet(0)).toBe(blocks - 1);
    expect(map.nextSet(blocks - 1)).toBe(blocks - 1);
    expect(map.windowEnd(0, blocks, 1)).toBe(blocks);
    expect(map.windowEnd(0, blocks - 1, 1)).toBe(0);
    map.assign(31, 32, true); // bit 31 of a word: the sign bit
    expect(map.nextSet(0)).toBe(31);
    expect(map.nextSet(31)).toBe(31);
    expect(map.nextSet(32)).toBe(blocks - 1);
    map.assign(40, 100, true);
    // Counted in redirected blocks: a run is cut where the count is reached.
    expect(map.windowEnd(0, 1000, 1000)).toBe(100);
    expect(map.windowEnd(0, 1000, 10)).toBe(49);
    expect(map.windowEnd(32, 1000, 10)).toBe(50);
    expect(map.windowEnd(0, 60, 1000)).toBe(60);
    expect(map.windowEnd(32, 70, 1000)).toBe(70);
    expect(map.windowEnd(0, 40, 1000)).toBe(32);
    expect(map.windowEnd(0, 31, 1000)).toBe(0);
    expect(map.windowEnd(0, 0, 1000)).toBe(0);
  });

  test('payload_and_load_round_trip', () => {
    const seed = seedFromEnv();
    console.log(`payload seed: ${seed} (replay with CLDD_SEED=${seed})`);
    const random = rng(seed);
    const blocks = 2 * BITS_4K + 999;
    const map = new BlockMap(blocks, 4096);
    for (let i = 0; i < 200; i++) {
      const s = between(random, 0, blocks - 1);
      map.assign(s, Math.min(blocks, s + between(random, 1, 300)), random() < 0.7);
    }
    const copy = new BlockMap(blocks, 4096);
    for (let p = 0; p < map.pageCount; p++) {
      const payload = map.payload(p);
      if (!payload) continue;
      expect(payload.length).toBe(4096 - MAP_SLOT_HEADER);
      // Loaded from inside a larger buffer at an offset, as from a map slot image.
      const slot = new Uint8Array(4096);
      slot.set(payload, MAP_SLOT_HEADER);
      copy.load(p, slot.subarray(MAP_SLOT_HEADER));
    }
    expect(copy.count).toBe(map.count);
    expect(runsOf(copy, 0, blocks)).toEqual(runsOf(map, 0, blocks));
    // Loading does not make pages dirty.
    expect(copy.dirtyPages).toBe(0);
    // payload is a view of the bitmap, not a copy (a commit encodes it under the map lock):
    // a change to the map shows in it.
    map.assign(0, 1, true);
    map.assign(1, 2, false);
    const view = map.payload(0);
    expect(view && view[0] & 3).toBe(1);
    map.assign(1, 2, true);
    expect(view && view[0] & 3).toBe(3);
    // Loading an all-zero payload over a page clears it.
    copy.load(0, new Uint8Array(4096 - MAP_SLOT_HEADER));
    expect(copy.payload(0)).toBeNull();
    expect(copy.nextSet(0)).toBe(map.nextSet(BITS_4K));
  });

  test('load_rejects_bits_beyond_the_last_block', () => {
    const blocks = BITS_4K + 10;
    const map = new BlockMap(blocks, 4096);
    const payload = new Uint8Array(4096 - MAP_SLOT_HEADER);
    payload[1] = 0x02; // block BITS_4K + 9: the last block, allowed
    map.load(1, payload);
    expect(map.test(blocks - 1)).toBe(true);
    expect(map.count).toBe(1);
    const bad = new Uint8Array(4096 - MAP_SLOT_HEADER);
    bad[1] = 0x04; // block BITS_4K + 10: beyond the end
    let err: unknown;
    try {
      map.load(1, bad);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(CldError);
    expect((err as CldError).code).toBe('CLDD_CORRUPT');
    expect((err as Error).message).toMatch(/map page 1 marks block 32266, beyond the last block 32265/);
    // The rejected payload left the map as it was.
    expect(map.count).toBe(1);
    expect(map.test(blocks - 1)).toBe(true);
    // The very last bit of the page, too.
    const last = new Uint8Array(4096 - MAP_SLOT_HEADER);
    last[last.length - 1] = 0x80;
    expect(() => map.load(1, last)).toThrow(/beyond the last block/);
  });

  test('dirty_tracking_marks_exactly_the_changed_pages', () => {
    const map = new BlockMap(4 * BITS_4K, 4096);
    expect(map.dirtyPages).toBe(0);
    map.assign(BITS_4K - 1, BITS_4K + 1, true); // pages 0 and 1
    map.assign(3 * BITS_4K + 5, 3 * BITS_4K + 6, true); // page 3
    map.assign(2 * BITS_4K, 2 * BITS_4K + 10, false); // page 2: no change
    expect(map.dirtyPages).toBe(3);
    expect(map.takeDirty()).toEqual([0, 1, 3]);
    expect(map.dirtyPages).toBe(0);
    expect(map.takeDirty()).toEqual([]);
    // A no-op assignment leaves pages clean; a real change marks them again.
    map.assign(BITS_4K - 1, BITS_4K + 1, true);
    expect(map.dirtyPages).toBe(0);
    map.assign(3 * BITS_4K + 5, 3 * BITS_4K + 6, false);
    map.assign(3 * BITS_4K + 7, 3 * BITS_4K + 8, true);
    expect(map.takeDirty()).toEqual([3]);
    map.markDirty(2);
    map.markDirty(2);
    expect(map.takeDirty()).toEqual([2]);
  });

  test('an_all_clear_page_drops_its_view', () => {
    const map = new BlockMap(3 * BITS_4K, 4096);
    expect(map.residentBytes).toBe(0);
    map.assign(5, 6, true);
    map.assign(BITS_4K + 5, BITS_4K + 900, true);
    expect(map.residentBytes).toBe(2 * (4096 - MAP_SLOT_HEADER));
    map.assign(BITS_4K, 2 * BITS_4K, false);
    expect(map.residentBytes).toBe(4096 - MAP_SLOT_HEADER);
    expect(map.payload(1)).toBeNull();
    map.assign(5, 6, false);
    expect(map.residentBytes).toBe(0);
    expect(map.count).toBe(0);
    // Clearing bits of an empty page allocates nothing.
    map.assign(0, 3 * BITS_4K, false);
    expect(map.residentBytes).toBe(0);
  });

  test('the_memory_of_a_map_all_clear_again_goes_back_to_the_kernel', () => {
    // A 1 TiB area all redirected, then resynced: clearing the bits dropped the pages' views but
    // kept their 33.5 MB; releaseIfEmpty (the move to plain) gives them back.
    const rss = () => Number(readFileSync('/proc/self/statm', 'utf8').split(' ')[1]) * 4096;
    const blocks = 268435456;
    const map = new BlockMap(blocks, 4096);
    map.assign(0, blocks, true);
    const full = rss();
    map.assign(0, blocks, false);
    map.releaseIfEmpty();
    expect(full - rss()).toBeGreaterThan(30 * 1024 * 1024);
    // The map goes on: its bits read as clear and can be set again, and one set keeps them.
    expect(map.nextSet(0)).toBe(-1);
    map.assign(7, 8, true);
    map.releaseIfEmpty();
    expect([map.test(7), map.count]).toEqual([true, 1]);
  });

  test('a_1_TiB_area_at_4_KiB_blocks_fully_redirected_stays_under_64_MiB', () => {
    const blocks = 268435456; // 1 TiB / 4 KiB
    const map = new BlockMap(blocks, 4096);
    expect(map.residentBytes).toBe(0);
    map.assign(0, blocks, true);
    expect(map.count).toBe(blocks);
    expect(map.test(blocks - 1)).toBe(true);
    expect(map.residentBytes).toBeLessThan(64 * 1024 * 1024);
    expect(map.residentBytes).toBe(map.pageCount * (4096 - MAP_SLOT_HEADER));
    expect(runsOf(map, 0, blocks)).toEqual([[0, blocks, true]]);
    map.assign(0, blocks, false);
    expect(map.residentBytes).toBe(0);
  });
});
