/**
 * The on-disk format: the layout is the largest that fits, every structure round-trips, and every
 * torn or corrupted byte of a superblock copy or map slot is detected.
 */
import { describe, expect, test } from 'vitest';
import { CldError } from '../src/errors.js';
import { crc32c } from '../src/format/crc32c.js';
import {
  AREA_ALIGN,
  computeLayout,
  decodeMapSlot,
  decodeSuperblock,
  encodeMapSlot,
  encodeMapSlotInto,
  encodeSuperblock,
  encodeSuperblockInto,
  FORMAT_VERSION,
  MAP_SLOT_HEADER,
  MIN_AREA_BYTES,
  NAME_BYTES,
  newUuid,
  SUPERBLOCK_BYTES,
  type Layout,
  type Superblock,
} from '../src/format/format.js';
import { rng, seedFromEnv } from './support/random.js';

const MiB = 1 << 20;
const GiB = 1 << 30;
const BLOCK_SIZES = [4096, 8192, 16384, 32768, 65536];

function codeOf(fn: () => unknown): { code: string | undefined; message: string } {
  try {
    fn();
  } catch (err) {
    expect(err).toBeInstanceOf(CldError);
    return { code: (err as CldError).code, message: (err as Error).message };
  }
  throw new Error('expected an error');
}

/** The same layout equations as docs/format.md (version 3), for `blocks` blocks. */
function layoutEnd(blockSize: number, blocks: number): number {
  const bitsPerPage = (blockSize - MAP_SLOT_HEADER) * 8;
  const mapPages = Math.ceil(blocks / bitsPerPage);
  const chunks = Math.ceil((blocks * blockSize) / 65536);
  const trackingPages = Math.ceil(chunks / ((blockSize - MAP_SLOT_HEADER - 8) * 8));
  const align = (n: number) => Math.ceil(n / AREA_ALIGN) * AREA_ALIGN;
  const dataOffset = align(2 * blockSize + 2 * (mapPages + 2 * trackingPages) * blockSize);
  const changeOffset = align(dataOffset + blocks * blockSize);
  return changeOffset + blocks * blockSize;
}

function expectSaneLayout(l: Layout, storeSize: number, blockSize: number): void {
  expect(l.blockSize).toBe(blockSize);
  expect(l.storeSize).toBe(storeSize);
  expect(l.bitsPerPage).toBe((blockSize - MAP_SLOT_HEADER) * 8);
  expect(l.mapOffset).toBe(2 * blockSize);
  expect(l.mapPages).toBe(Math.ceil(l.blocks / l.bitsPerPage));
  // Areas aligned, in order, not overlapping, inside the store.
  expect(l.dataOffset % AREA_ALIGN).toBe(0);
  expect(l.changeOffset % AREA_ALIGN).toBe(0);
  expect(l.dataOffset).toBeGreaterThanOrEqual(l.mapOffset + 2 * (l.mapPages + 2 * l.trackingPages) * blockSize);
  expect(l.chunkShift).toBe(16);
  expect(l.chunks).toBe(Math.ceil((l.blocks * blockSize) / 65536));
  expect(l.trackingPages).toBe(Math.ceil(l.chunks / l.trackingBitsPerPage));
  expect(l.changeOffset).toBeGreaterThanOrEqual(l.dataOffset + l.blocks * blockSize);
  expect(l.changeOffset + l.blocks * blockSize).toBeLessThanOrEqual(storeSize);
  expect(l.blocks * blockSize).toBeGreaterThanOrEqual(MIN_AREA_BYTES);
  // As large as possible: one more block in each area would not fit.
  expect(layoutEnd(blockSize, l.blocks)).toBe(l.changeOffset + l.blocks * blockSize);
  expect(layoutEnd(blockSize, l.blocks + 1)).toBeGreaterThan(storeSize);
}

function sampleSuperblock(blockSize = 4096, storeSize = 64 * MiB): Superblock {
  return {
    uuid: Uint8Array.from({ length: 16 }, (_, i) => 0xa0 + i),
    generation: 123456789012,
    state: 'snapshot',
    epoch: 42,
    stateChangedAt: 1_700_000_000_123,
    createdAt: 1_600_000_000_456,
    name: 'pair-α',
    layout: computeLayout(storeSize, blockSize),
    map: { commit: 987654321, digest: 0xdeadbeef },
    version: 3,
  };
}

describe('computeLayout', () => {
  test('data_and_change_areas_are_equal_and_as_large_as_possible', () => {
    const seed = seedFromEnv();
    console.log(`layout seed: ${seed} (replay with CLDD_SEED=${seed})`);
    const random = rng(seed);
    const sizes = [3 * MiB, 3 * MiB + 4096, 4 * MiB - 1, 10 * MiB + 12345, 100 * MiB, GiB, 17 * GiB + 7, 4096 * GiB];
    for (let i = 0; i < 40; i++) sizes.push(3 * MiB + Math.floor(random() * 64 * GiB));
    for (const blockSize of BLOCK_SIZES) {
      for (const size of sizes) {
        let layout: Layout;
        try {
          layout = computeLayout(size, blockSize);
        } catch (err) {
          // Only tiny stores may be refused.
          expect((err as CldError).code, `store ${size} at ${blockSize}`).toBe('CLDD_TOO_SMALL');
          expect(size).toBeLessThan(4 * MiB);
          continue;
        }
        expectSaneLayout(layout, size, blockSize);
      }
    }
  });

  test('a_store_that_needs_several_map_pages_gets_them', () => {
    const layout = computeLayout(20 * GiB, 4096);
    expect(layout.mapPages).toBe(82); // 10 GiB per area / (32256 blocks of 4 KiB per page)
    expectSaneLayout(layout, 20 * GiB, 4096);
  });

  test.each(BLOCK_SIZES)('too_small_store_names_the_minimum (block size %i)', (blockSize) => {
    const small = codeOf(() => computeLayout(MiB, blockSize));
    expect(small.code).toBe('CLDD_TOO_SMALL');
    const minimum = Number(/at least (\d+) bytes/.exec(small.message)?.[1]);
    expect(minimum).toBeGreaterThan(0);
    expect(small.message).toContain(String(MiB));
    // The minimum is exact: it works, one byte less does not.
    expectSaneLayout(computeLayout(minimum, blockSize), minimum, blockSize);
    expect(codeOf(() => computeLayout(minimum - 1, blockSize)).code).toBe('CLDD_TOO_SMALL');
    expect(codeOf(() => computeLayout(0, blockSize)).code).toBe('CLDD_TOO_SMALL');
  });

  test.each([0, 512, 2048, 4095, 4097, 6144, 12288, 131072, -4096, 4096.5, NaN])('bad_block_size_%s_is_EINVAL', (blockSize) => {
    const { code, message } = codeOf(() => computeLayout(64 * MiB, blockSize));
    expect(code).toBe('EINVAL');
    expect(message).toContain('block size');
  });
});

describe('superblock', () => {
  test.each(BLOCK_SIZES)('round_trip_keeps_every_field (block size %i)', (blockSize) => {
    for (const state of ['plain', 'snapshot', 'resync'] as const) {
      const sb = { ...sampleSuperblock(blockSize, 5 * GiB + 3), state };
      const image = encodeSuperblock(sb);
      expect(image.length).toBe(blockSize);
      // Only the first sector is defined; the rest of the block is zero.
      expect(image.subarray(SUPERBLOCK_BYTES).every((b) => b === 0)).toBe(true);
      const v = decodeSuperblock(image);
      expect(v.ok).toBe(true);
      if (!v.ok) return;
      expect(v.sb).toEqual(sb);
      expect(Array.from(v.sb.uuid)).toEqual(Array.from(sb.uuid));
    }
  });

  test('decodes_from_a_buffer_at_an_odd_byte_offset', () => {
    const sb = sampleSuperblock();
    const backing = new Uint8Array(SUPERBLOCK_BYTES + 3);
    backing.set(encodeSuperblock(sb).subarray(0, SUPERBLOCK_BYTES), 3);
    const v = decodeSuperblock(backing.subarray(3));
    expect(v.ok && v.sb).toEqual(sb);
  });

  test('layout_is_stored_byte_by_byte_as_specified', () => {
    const sb = sampleSuperblock();
    const image = encodeSuperblock(sb);
    const v = new DataView(image.buffer);
    expect(Buffer.from(image.subarray(0, 8)).toString('latin1')).toBe('cldd-sb\0');
    expect(v.getUint32(8, true)).toBe(crc32c(image, 12, SUPERBLOCK_BYTES));
    expect(v.getUint32(12, true)).toBe(FORMAT_VERSION);
    expect(Number(v.getBigUint64(32, true))).toBe(sb.generation);
    expect(v.getUint32(40, true)).toBe(4096);
    expect(v.getUint32(44, true)).toBe(1); // snapshot
    expect(Number(v.getBigUint64(48, true))).toBe(sb.layout.storeSize);
    expect(Number(v.getBigUint64(56, true))).toBe(sb.layout.blocks);
    expect(Number(v.getBigUint64(80, true))).toBe(sb.layout.dataOffset);
    expect(Number(v.getBigUint64(88, true))).toBe(sb.layout.changeOffset);
    expect(Number(v.getBigUint64(96, true))).toBe(42);
    expect(v.getUint32(124, true)).toBe(Buffer.byteLength('pair-α'));
  });

  test('crc32c_is_the_castagnoli_checksum', () => {
    // The standard check value of CRC-32C over "123456789".
    expect(crc32c(new TextEncoder().encode('123456789'))).toBe(0xe3069283);
    expect(crc32c(new Uint8Array(0))).toBe(0);
  });

  test('crc32c_agrees_with_the_bitwise_definition_at_every_length_and_alignment', () => {
    // The addon's word-at-a-time loops (the CPU's instruction, or slicing-by-8) against the
    // polynomial applied bit by bit, over lengths and starts that exercise every head and tail.
    const reference = (data: Uint8Array, seed = 0): number => {
      let c = ~seed >>> 0;
      for (const byte of data) {
        c ^= byte;
        for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ 0x82f63b78 : c >>> 1;
      }
      return ~c >>> 0;
    };
    let x = 0x2545f491;
    const bytes = new Uint8Array(4096 + 16).map(() => ((x = (Math.imul(x, 1103515245) + 12345) >>> 0) >>> 24));
    for (let start = 0; start < 8; start++) {
      for (const length of [...Array(70).keys(), 511, 512, 4095, 4096]) {
        expect(crc32c(bytes, start, start + length)).toBe(reference(bytes.subarray(start, start + length)));
      }
    }
    // A seed continues a CRC: the CRC of a whole is that of its tail seeded with its head's.
    const head = crc32c(bytes, 0, 1000);
    expect(crc32c(bytes, 1000, 4096, head)).toBe(crc32c(bytes, 0, 4096));
    expect(crc32c(bytes, 3, 3 + 100, 0xdeadbeef)).toBe(reference(bytes.subarray(3, 103), 0xdeadbeef));
    // A view into a larger buffer is checksummed from its own first byte.
    expect(crc32c(bytes.subarray(5, 900), 7, 300)).toBe(reference(bytes.subarray(12, 305)));
  });

  test('crc32c_refuses_a_range_outside_its_buffer', () => {
    const data = new Uint8Array(16);
    for (const [start, end] of [[0, 17], [-1, 4], [8, 4], [0.5, 4]]) {
      expect(() => crc32c(data, start, end)).toThrow(expect.objectContaining({ code: 'EINVAL' }));
    }
  });

  test('utf8_names_up_to_64_bytes_round_trip', () => {
    const names = ['', 'a', 'x'.repeat(NAME_BYTES), '€'.repeat(21), '🙂'.repeat(16), '名前-ボリューム'];
    for (const name of names) {
      const sb = { ...sampleSuperblock(), name };
      const v = decodeSuperblock(encodeSuperblock(sb));
      expect(v.ok && v.sb.name).toBe(name);
    }
  });

  test.each(['x'.repeat(NAME_BYTES + 1), '€'.repeat(22), '🙂'.repeat(16) + 'a'])('a_name_over_64_bytes_is_EINVAL (%s)', (name) => {
    const { code, message } = codeOf(() => encodeSuperblock({ ...sampleSuperblock(), name }));
    expect(code).toBe('EINVAL');
    expect(message).toContain('64 bytes');
  });

  test('encoded_into_a_used_buffer_at_an_offset_it_is_the_same_image', () => {
    // A commit encodes into buffers it reuses: nothing of what they held may stay.
    const sb = sampleSuperblock();
    const bs = sb.layout.blockSize;
    const used = new Uint8Array(3 * bs).fill(0xa5);
    const image = encodeSuperblockInto(used.subarray(bs, 2 * bs), sb);
    expect(image.byteOffset).toBe(bs);
    expect(Buffer.from(image).equals(Buffer.from(encodeSuperblock(sb)))).toBe(true);
    expect(used.subarray(0, bs).every((b) => b === 0xa5) && used.subarray(2 * bs).every((b) => b === 0xa5)).toBe(true);
    expect(codeOf(() => encodeSuperblockInto(used.subarray(0, bs - 1), sb)).code).toBe('EINVAL');
    // A name too long fails before any byte changes meaning: the error, not a truncated name.
    expect(codeOf(() => encodeSuperblockInto(used.subarray(0, bs), { ...sb, name: 'y'.repeat(NAME_BYTES + 1) })).code).toBe('EINVAL');
  });

  test('every_bit_of_the_checksummed_sector_is_guarded', () => {
    const image = encodeSuperblock(sampleSuperblock());
    let checked = 0;
    for (let offset = 0; offset < SUPERBLOCK_BYTES; offset++) {
      for (const bit of [0, 7]) {
        const bad = image.slice();
        bad[offset] ^= 1 << bit;
        const v = decodeSuperblock(bad);
        expect(v.ok, `bit ${bit} of byte ${offset}`).toBe(false);
        if (v.ok) continue;
        // Only a hit on the magic makes the copy look foreign; anything else is a torn copy.
        expect(v.kind, `byte ${offset}: ${v.reason}`).toBe(offset < 8 ? 'foreign' : 'torn');
        if (offset >= 8) expect(v.reason).toBe('checksum mismatch');
        checked++;
      }
    }
    expect(checked).toBe(2 * SUPERBLOCK_BYTES);
  });

  /** Fields rewritten with a valid checksum: each semantic check must catch its own field. */
  test('a_field_with_a_matching_checksum_is_still_validated', () => {
    const base = encodeSuperblock(sampleSuperblock());
    const reseal = (edit: (v: DataView, b: Uint8Array) => void) => {
      const b = base.slice();
      const v = new DataView(b.buffer);
      edit(v, b);
      v.setUint32(8, crc32c(b, 12, SUPERBLOCK_BYTES), true);
      return decodeSuperblock(b);
    };
    const cases: [string, (v: DataView, b: Uint8Array) => void, RegExp][] = [
      ['version', (v) => v.setUint32(12, 4, true), /format version 4 \(this cldd reads versions 1 to 3\)/],
      ['version 2 with version 3 layout', (v) => v.setUint32(12, 2, true), /layout fields disagree|reserved bytes/],
      ['chunk shift', (v) => v.setUint32(204, 12, true), /chunk shift 12/],
      ['version 0', (v) => v.setUint32(12, 0, true), /format version 0/],
      ['map commit', (v) => v.setBigUint64(192, 1n << 53n, true), /mapCommit out of range/],
      ['block size', (v) => v.setUint32(40, 6000, true), /block size 6000/],
      ['state', (v) => v.setUint32(44, 3, true), /state code 3/],
      ['store size too small', (v) => v.setBigUint64(48, 4096n, true), /store size/],
      ['store size other', (v) => v.setBigUint64(48, BigInt(128 * MiB), true), /layout fields disagree/],
      ['blocks', (v) => v.setBigUint64(56, v.getBigUint64(56, true) + 1n, true), /layout fields disagree/],
      ['map offset', (v) => v.setBigUint64(64, 0n, true), /layout fields disagree/],
      ['map pages', (v) => v.setBigUint64(72, 2n, true), /layout fields disagree/],
      ['data offset', (v) => v.setBigUint64(80, v.getBigUint64(80, true) + 4096n, true), /layout fields disagree/],
      ['change offset', (v) => v.setBigUint64(88, 0n, true), /layout fields disagree/],
      ['name length', (v) => v.setUint32(124, 65, true), /name length 65/],
      ['name bytes', (_v, b) => b.set([0xff, 0xfe], 128), /not UTF-8/],
      ['generation', (v) => v.setBigUint64(32, 1n << 60n, true), /generation out of range/],
      ['generation 0', (v) => v.setBigUint64(32, 0n, true), /generation 0/],
      ['epoch', (v) => v.setBigUint64(96, 1n << 60n, true), /epoch out of range/],
      // Timestamps past 2^53 once decoded to NaN: check said clean, then open failed on BigInt(NaN).
      ['state change time', (v) => v.setBigUint64(104, 1n << 53n, true), /stateChangedAt out of range/],
      ['format time', (v) => v.setBigUint64(112, 0xffffffffffffffffn, true), /createdAt out of range/],
      ['store size', (v) => v.setBigUint64(48, 1n << 62n, true), /storeSize out of range/],
      ['blocks', (v) => v.setBigUint64(56, 1n << 63n, true), /blocks out of range/],
      ['name padding', (_v, b) => (b[128 + Buffer.byteLength('pair-α') + 3] = 1), /bytes after the name are not zero/],
      ['reserved', (_v, b) => (b[511] = 1), /reserved bytes .* are not zero/],
    ];
    for (const [what, edit, reason] of cases) {
      const v = reseal(edit);
      expect(v.ok, what).toBe(false);
      if (!v.ok) {
        expect(v.kind, what).toBe('damaged');
        expect(v.reason, what).toMatch(reason);
      }
    }
  });

  test('a_torn_superblock_sector_is_detected', () => {
    // A sector half-written when the power failed: a prefix of the new copy over the old one.
    const old = encodeSuperblock(sampleSuperblock());
    const next = encodeSuperblock({ ...sampleSuperblock(), generation: 123456789013, state: 'resync', stateChangedAt: 1_700_000_999_000, name: 'pair-β' });
    let torn = 0;
    for (let cut = 1; cut < SUPERBLOCK_BYTES; cut++) {
      const mixed = old.slice();
      mixed.set(next.subarray(0, cut));
      if (Buffer.from(mixed).equals(Buffer.from(old)) || Buffer.from(mixed).equals(Buffer.from(next))) continue;
      const v = decodeSuperblock(mixed);
      expect(v.ok, `torn at byte ${cut}`).toBe(false);
      torn++;
    }
    expect(torn).toBeGreaterThan(100);
    // Garbage in the tail of the sector, and a zeroed tail.
    const seed = seedFromEnv();
    console.log(`torn superblock seed: ${seed} (replay with CLDD_SEED=${seed})`);
    const random = rng(seed);
    for (let i = 0; i < 200; i++) {
      const at = 8 + Math.floor(random() * (SUPERBLOCK_BYTES - 8));
      const bad = next.slice();
      for (let k = at; k < SUPERBLOCK_BYTES; k++) bad[k] = Math.floor(random() * 256);
      bad[at] = next[at] ^ (1 + Math.floor(random() * 255)); // at least one byte differs
      expect(decodeSuperblock(bad).ok, `garbage from byte ${at}`).toBe(false);
      const zeroed = next.slice();
      zeroed.fill(0, at, SUPERBLOCK_BYTES);
      if (!Buffer.from(zeroed).equals(Buffer.from(next))) expect(decodeSuperblock(zeroed).ok, `zeros from byte ${at}`).toBe(false);
    }
  });

  test('short_zero_and_foreign_buffers_are_foreign', () => {
    const short = decodeSuperblock(encodeSuperblock(sampleSuperblock()).subarray(0, SUPERBLOCK_BYTES - 1));
    expect(short).toMatchObject({ ok: false, kind: 'foreign' });
    expect(decodeSuperblock(new Uint8Array(4096))).toMatchObject({ ok: false, kind: 'foreign', reason: 'no cldd signature' });
    const mapSlot = encodeMapSlot(computeLayout(64 * MiB, 4096), newUuid(), 0, 1, null);
    expect(decodeSuperblock(mapSlot)).toMatchObject({ ok: false, kind: 'foreign' });
  });
});

describe('map slot', () => {
  const layout = computeLayout(64 * MiB, 4096);
  const uuid = Uint8Array.from({ length: 16 }, (_, i) => i * 7 + 1);

  function payloadFor(seed: number): Uint8Array {
    const random = rng(seed);
    return Uint8Array.from({ length: layout.blockSize - MAP_SLOT_HEADER }, () => Math.floor(random() * 256));
  }

  test('round_trip_keeps_header_and_payload', () => {
    const payload = payloadFor(1);
    for (const [page, sequence] of [
      [0, 1],
      [3, 2 ** 40],
      [7, Number.MAX_SAFE_INTEGER],
    ]) {
      const image = encodeMapSlot(layout, uuid, page, sequence, payload, sequence - 1, 0xfedcba98);
      expect(image.length).toBe(layout.blockSize);
      const v = decodeMapSlot(layout, uuid, page, image);
      expect(v).toEqual({ ok: true, header: { sequence, page, commit: sequence - 1, mapDigest: 0xfedcba98 } });
      expect(Buffer.from(image.subarray(MAP_SLOT_HEADER)).equals(Buffer.from(payload))).toBe(true);
    }
    // An empty page is all-zero payload.
    const empty = encodeMapSlot(layout, uuid, 0, 1, null);
    expect(decodeMapSlot(layout, uuid, 0, empty).ok).toBe(true);
    expect(empty.subarray(MAP_SLOT_HEADER).every((b) => b === 0)).toBe(true);
  });

  test('encoded_into_a_used_buffer_at_an_offset_it_is_the_same_image', () => {
    const bs = layout.blockSize;
    const used = new Uint8Array(3 * bs).fill(0x5a);
    for (const payload of [payloadFor(2), payloadFor(3).subarray(0, 100), null]) {
      const image = encodeMapSlotInto(used.subarray(bs, 2 * bs), uuid, 5, 11, payload, 10, 0x1234);
      expect(Buffer.from(image).equals(Buffer.from(encodeMapSlot(layout, uuid, 5, 11, payload, 10, 0x1234)))).toBe(true);
    }
    expect(used.subarray(0, bs).every((b) => b === 0x5a) && used.subarray(2 * bs).every((b) => b === 0x5a)).toBe(true);
    expect(codeOf(() => encodeMapSlotInto(used.subarray(0, bs), uuid, 5, 11, new Uint8Array(bs)))).toMatchObject({ code: 'EINVAL' });
    // A u64 field takes a whole number from 0 to 2^53 - 1, or the encoding fails.
    for (const bad of [-1, 1.5, Number.MAX_SAFE_INTEGER + 1, Number.NaN]) {
      expect(codeOf(() => encodeMapSlot(layout, uuid, 5, bad, null)).code).toBe('EINVAL');
      expect(codeOf(() => encodeSuperblock({ ...sampleSuperblock(), generation: bad })).code).toBe('EINVAL');
    }
  });

  test.each(BLOCK_SIZES)('every_header_and_payload_byte_is_guarded (block size %i)', (blockSize) => {
    const l = computeLayout(64 * MiB, blockSize);
    const random = rng(blockSize);
    const payload = Uint8Array.from({ length: blockSize - MAP_SLOT_HEADER }, () => Math.floor(random() * 256));
    const image = encodeMapSlot(l, uuid, 0, 9, payload);
    const missed: string[] = [];
    let checked = 0;
    for (let offset = 0; offset < blockSize; offset++) {
      // Every header byte, and a sample of the payload (every byte at 4 KiB).
      if (offset >= MAP_SLOT_HEADER && blockSize > 4096 && offset % 251 !== 0 && offset !== blockSize - 1) continue;
      const bad = image.slice();
      bad[offset] ^= 0x10;
      const v = decodeMapSlot(l, uuid, 0, bad);
      checked++;
      // A hit on the magic loses the signature; a hit anywhere else breaks the checksum. Either
      // way the slot is torn, never unused: a damaged newest slot must not pass as never written.
      if (v.ok) missed.push(`byte ${offset}: accepted`);
      else if (!(offset < 8 ? /signature/ : /^checksum mismatch$/).test(v.reason)) missed.push(`byte ${offset}: ${v.reason}`);
      else if (v.kind !== 'torn') missed.push(`byte ${offset}: kind ${v.kind}`);
    }
    expect(missed).toEqual([]);
    expect(checked).toBeGreaterThanOrEqual(blockSize === 4096 ? 4096 : MAP_SLOT_HEADER);
  });

  test('a_torn_slot_is_detected_at_any_sector_boundary', () => {
    const old = encodeMapSlot(layout, uuid, 2, 5, payloadFor(2));
    const next = encodeMapSlot(layout, uuid, 2, 6, payloadFor(3));
    const sectors = layout.blockSize / 512;
    for (let mask = 1; mask < (1 << sectors) - 1; mask++) {
      const mixed = old.slice();
      for (let s = 0; s < sectors; s++) if (mask & (1 << s)) mixed.set(next.subarray(s * 512, (s + 1) * 512), s * 512);
      expect(decodeMapSlot(layout, uuid, 2, mixed).ok, `sectors ${mask.toString(2)} new`).toBe(false);
    }
  });

  test('a_slot_of_another_store_is_rejected', () => {
    const other = newUuid();
    const v = decodeMapSlot(layout, uuid, 0, encodeMapSlot(layout, other, 0, 3, payloadFor(4)));
    expect(v).toEqual({ ok: false, kind: 'unused', reason: 'belongs to another store' });
  });

  test('a_slot_labelled_with_another_page_is_rejected', () => {
    const v = decodeMapSlot(layout, uuid, 4, encodeMapSlot(layout, uuid, 5, 3, payloadFor(5)));
    expect(v).toEqual({ ok: false, kind: 'damaged', reason: 'labelled page 5' });
  });

  test('a_slot_of_the_wrong_size_or_without_magic_is_rejected', () => {
    const image = encodeMapSlot(layout, uuid, 0, 1, null);
    expect(decodeMapSlot(layout, uuid, 0, image.subarray(0, 2048))).toMatchObject({ ok: false, kind: 'damaged', reason: 'slot of 2048 bytes' });
    expect(decodeMapSlot(layout, uuid, 0, new Uint8Array(layout.blockSize))).toEqual({ ok: false, kind: 'unused', reason: 'no map signature' });
    const superblock = encodeSuperblock(sampleSuperblock());
    expect(decodeMapSlot(layout, uuid, 0, superblock)).toMatchObject({ ok: false, kind: 'torn', reason: expect.stringMatching(/signature/) });
  });

  test('a_slot_with_impossible_header_fields_is_damaged', () => {
    const reseal = (edit: (v: DataView, b: Uint8Array) => void) => {
      const image = encodeMapSlot(layout, uuid, 0, 3, payloadFor(6));
      edit(new DataView(image.buffer), image);
      new DataView(image.buffer).setUint32(8, crc32c(image, 12, image.length), true);
      return decodeMapSlot(layout, uuid, 0, image);
    };
    expect(reseal((v) => v.setBigUint64(16, 0n, true))).toEqual({ ok: false, kind: 'damaged', reason: 'sequence 0' });
    expect(reseal((v) => v.setBigUint64(24, 1n << 63n, true))).toEqual({ ok: false, kind: 'damaged', reason: `labelled page ${1n << 63n}` });
    expect(reseal((v) => v.setBigUint64(48, 1n << 53n, true))).toEqual({ ok: false, kind: 'damaged', reason: 'commit out of range' });
    for (const at of [12, 15, 60, MAP_SLOT_HEADER - 1]) {
      expect(reseal((_v, b) => (b[at] = 1)), `byte ${at}`).toEqual({ ok: false, kind: 'damaged', reason: 'reserved header bytes are not zero' });
    }
  });

  test('a_sequence_beyond_safe_integers_is_rejected', () => {
    const image = encodeMapSlot(layout, uuid, 0, 1, null);
    const v = new DataView(image.buffer);
    v.setBigUint64(16, 1n << 60n, true);
    v.setUint32(8, crc32c(image, 12, image.length), true);
    expect(decodeMapSlot(layout, uuid, 0, image)).toEqual({ ok: false, kind: 'damaged', reason: 'sequence out of range' });
  });
});

test('a superblock with feature flags this version does not know is refused', async () => {
  const { computeLayout, decodeSuperblock, encodeSuperblock, newUuid } = await import('../src/format/format.js');
  const { crc32c } = await import('../src/format/crc32c.js');
  const buf = encodeSuperblock({
    uuid: newUuid(),
    generation: 1,
    state: 'plain',
    epoch: 0,
    stateChangedAt: 0,
    createdAt: 0,
    name: '',
    layout: computeLayout(8 << 20, 4096),
    map: { commit: 0, digest: 0 },
    version: 3,
  });
  const v = new DataView(buf.buffer);
  v.setUint32(120, 4, true);
  v.setUint32(8, crc32c(buf, 12, 512), true);
  const verdict = decodeSuperblock(buf);
  expect(verdict.ok).toBe(false);
  expect(verdict.ok ? '' : verdict.reason).toMatch(/unknown feature flags 4/);
});
