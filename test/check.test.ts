/**
 * Offline check: what it calls clean, what it warns about (traces of an interrupted write that
 * the next open repairs), what it calls damage, and that it never writes.
 */
import { describe, expect, test } from 'vitest';
import { check, type CheckReport } from '../src/engine/check.js';
import { Disk } from './support/disk.js';
import { encodeMapSlot, encodeSuperblock, MAP_SLOT_HEADER, mapSlotOffset, superblockOffset } from '../src/format/format.js';
import { crc32c } from '../src/format/crc32c.js';
import { Volume } from '../src/engine/volume.js';
import { MemoryStore } from '../src/io/memory-store.js';
import { rng, seedFromEnv } from './support/random.js';
import { stamped } from './support/stamp.js';
import { MutationRecorder } from './support/mutation-recorder.js';
import { digest } from './support/digest.js';
import { commitPage } from './support/forge.js';

const MiB = 1 << 20;
const BS = 4096;



/** Runs check and verifies it did not touch the store. */
async function checkReadOnly(store: MemoryStore): Promise<CheckReport> {
  const before = digest(store);
  const guard = new MutationRecorder(store);
  const report = await check(guard);
  expect(guard.mutations, 'check must not write').toEqual([]);
  expect(digest(store), 'store bytes after check').toBe(before);
  return report;
}

const errors = (r: CheckReport) => r.findings.filter((f) => f.severity === 'error').map((f) => f.message);
const warnings = (r: CheckReport) => r.findings.filter((f) => f.severity === 'warning').map((f) => f.message);

async function formatted(size = 4 * MiB, blockSize = BS, version?: 2 | 3): Promise<{ store: MemoryStore; volume: Volume }> {
  const store = new MemoryStore(size);
  const volume = await Volume.format(store, { blockSize, name: 'check', version });
  return { store, volume };
}

/**
 * A formatted store in snapshot with a few redirected blocks, committed and closed. Version 2:
 * the tests pin which superblock copy and slot each commit writes, and in version 3 the first
 * write after the snapshot adds a commit of its tracking page (tested in change-tracking.test.ts).
 */
async function withRedirects(): Promise<{ store: MemoryStore; volume: Volume }> {
  const { store, volume } = await formatted(4 * MiB, BS, 2);
  const disk = new Disk(volume);
  await volume.enable();
  await disk.write(3 * BS, stamped(3 * 8, 16, 1));
  await disk.flush();
  await volume.close();
  return { store, volume };
}

function flipByte(store: MemoryStore, offset: number): void {
  const b = new Uint8Array(1);
  store.readSync(b, offset);
  b[0] ^= 0x5a;
  store.writeSync(b, offset);
}

describe('check', () => {
  test('a_fresh_store_is_clean_with_no_findings', async () => {
    for (const blockSize of [4096, 65536]) {
      const { store, volume } = await formatted(8 * MiB, blockSize);
      const report = await checkReadOnly(store);
      expect(report.findings).toEqual([]);
      expect(report.clean).toBe(true);
      expect(report.foreign).toBe(false);
      expect(report.redirected).toBe(0);
      expect(report.superblock?.state).toBe('plain');
      expect(report.superblock?.name).toBe('check');
      expect(report.superblock?.layout).toEqual(volume.layout);
    }
  });

  test('a_store_in_snapshot_reports_its_redirected_blocks', async () => {
    const { store } = await withRedirects();
    const report = await checkReadOnly(store);
    expect(report.findings).toEqual([]);
    expect(report.clean).toBe(true);
    expect(report.superblock?.state).toBe('snapshot');
    expect(report.redirected).toBe(2);
  });

  test.each([0, 1])('a_torn_superblock_copy_%i_of_a_fresh_store_is_a_warning_only', async (copy) => {
    const { store } = await formatted();
    flipByte(store, superblockOffset(copy, BS) + 200);
    const report = await checkReadOnly(store);
    expect(errors(report)).toEqual([]);
    expect(warnings(report)).toHaveLength(1);
    expect(warnings(report)[0]).toMatch(new RegExp(`superblock copy ${copy} at offset ${copy * BS} is invalid \\(checksum mismatch\\)`));
    expect(report.clean).toBe(true);
    expect(report.superblock?.state).toBe('plain');
    // The next open repairs it, and check is quiet again.
    await (await Volume.open(store)).close();
    expect((await checkReadOnly(store)).findings).toEqual([]);
  });

  test('a_superblock_copy_torn_while_enabling_is_a_warning_only', async () => {
    // Enable writes the snapshot superblock to copy 1, then to copy 0. The power fails half-way
    // through copy 1's sector, so copy 0 was never rewritten.
    const { store, volume } = await formatted();
    const before = [0, 1].map((c) => {
      const buf = new Uint8Array(512);
      store.readSync(buf, superblockOffset(c, BS));
      return buf;
    });
    await volume.enable();
    const after = new Uint8Array(512);
    store.readSync(after, superblockOffset(1, BS));
    expect(Buffer.from(after).equals(Buffer.from(before[1]))).toBe(false);
    const torn = before[1].slice();
    torn.set(after.subarray(0, 40)); // the new checksum and generation, the old state and epoch
    store.writeSync(torn, superblockOffset(1, BS));
    store.writeSync(before[0], superblockOffset(0, BS));
    const report = await checkReadOnly(store);
    expect(errors(report)).toEqual([]);
    expect(warnings(report)).toEqual([`superblock copy 1 at offset ${BS} is invalid (checksum mismatch); the next open rewrites it`]);
    expect(report.clean).toBe(true);
    expect(report.superblock?.state).toBe('plain');
  });

  test('damage_to_the_older_superblock_copy_is_a_warning_only', async () => {
    const { store } = await withRedirects();
    // Enable wrote both copies; the flush's map commit then wrote copy 0. Damage copy 1.
    flipByte(store, superblockOffset(1, BS) + 200);
    const report = await checkReadOnly(store);
    expect(errors(report)).toEqual([]);
    expect(warnings(report)).toHaveLength(1);
    expect(report.clean).toBe(true);
    expect(report.superblock?.state).toBe('snapshot');
    expect(report.redirected).toBe(2);
  });

  test('damage_to_either_superblock_copy_keeps_the_current_state', async () => {
    // Every state change writes both copies, so the surviving copy is never an older state. A
    // map-only commit writes one: the surviving copy is one map commit behind, and that commit,
    // complete on disk, is rolled forward.
    const { store } = await withRedirects();
    flipByte(store, superblockOffset(0, BS) + 200);
    const report = await checkReadOnly(store);
    expect(errors(report)).toEqual([]);
    expect(warnings(report)).toEqual([
      'superblock copy 0 at offset 0 is invalid (checksum mismatch); the next open rewrites it',
      'map commit 1 is complete but the newest valid superblock copy records map commit 0 (an interrupted commit, or a lost superblock write); the next open records it',
    ]);
    expect(report.superblock?.state).toBe('snapshot');
    expect(report.redirected).toBe(2);
    await (await Volume.open(store)).close();
    expect((await checkReadOnly(store)).findings).toEqual([]);
  });

  test('superblock_copies_of_different_generations_are_a_warning', async () => {
    // A crash between the two superblock writes of a state change: copy 1 new, copy 0 old.
    const { store, volume } = await formatted();
    const old0 = new Uint8Array(BS);
    store.readSync(old0, superblockOffset(0, BS));
    await volume.enable();
    store.writeSync(old0, superblockOffset(0, BS));
    const report = await checkReadOnly(store);
    expect(errors(report)).toEqual([]);
    expect(warnings(report)).toEqual([
      'the superblock copies have generations 1 and 2: a state change was interrupted; the next open rewrites the older',
    ]);
    expect(report.superblock?.state).toBe('snapshot');
    await (await Volume.open(store)).close();
    expect((await checkReadOnly(store)).findings).toEqual([]);
  });

  test('a_torn_older_map_slot_is_a_warning_and_a_torn_newest_one_is_damage', async () => {
    const { store, volume } = await withRedirects();
    // The commit wrote slot 1 (sequence 2). Tearing the older slot 0 is what a crash in the next
    // commit leaves: a warning.
    let image = MemoryStore.copyOf(store);
    flipByte(image, mapSlotOffset(volume.layout, 0, 0) + MAP_SLOT_HEADER + 1000);
    let report = await checkReadOnly(image);
    expect(errors(report)).toEqual([]);
    expect(warnings(report)).toEqual(['map page 0 has one torn copy (slot 0: checksum mismatch; slot 1: sequence 2); the newest valid copy is used']);
    expect(report.clean).toBe(true);
    expect(report.redirected).toBe(2);
    // Slot 1 belongs to a completed commit: falling back to slot 0 would lose the redirects.
    image = MemoryStore.copyOf(store);
    flipByte(image, mapSlotOffset(volume.layout, 0, 1) + MAP_SLOT_HEADER + 1000);
    report = await checkReadOnly(image);
    expect(report.clean).toBe(false);
    expect(errors(report)).toEqual([
      'the map is not the one the superblock records for map commit 1 (a slot of a completed commit was damaged or lost): map page 0 looks damaged (slot 0: sequence 1; slot 1: checksum mismatch)',
    ]);
  });

  /**
   * The slot magic is outside the checksum, and a slot without magic counts as never written.
   * A bit flipped in the magic of the newest slot must not pass as an unused slot: the page
   * silently falls back to the older slot, and the master loses the blocks redirected since.
   */
  test('damage_to_the_magic_of_the_newest_map_slot_is_reported', async () => {
    const { store, volume } = await withRedirects();
    flipByte(store, mapSlotOffset(volume.layout, 0, 1) + 3); // slot 1 holds sequence 2
    const report = await checkReadOnly(store);
    expect(report.findings.map((f) => f.message).join('\n')).toMatch(/map page 0/);
  });

  test('a_timestamp_past_2^53_in_a_checksummed_superblock_is_damage_not_NaN', async () => {
    // Once such a copy decoded to NaN: check said clean, and open failed converting NaN to a BigInt.
    const { store } = await withRedirects();
    const reseal = (copy: number) => {
      const buf = new Uint8Array(512);
      store.readSync(buf, superblockOffset(copy, BS));
      const v = new DataView(buf.buffer);
      v.setBigUint64(104, 1n << 60n, true);
      v.setUint32(8, crc32c(buf, 12, 512), true);
      store.writeSync(buf, superblockOffset(copy, BS));
    };
    reseal(1);
    let report = await checkReadOnly(store);
    expect(errors(report)).toEqual([]);
    expect(warnings(report)).toEqual([`superblock copy 1 at offset ${BS} is invalid (stateChangedAt out of range); the next open rewrites it`]);
    reseal(0);
    report = await checkReadOnly(store);
    expect(report.clean).toBe(false);
    expect(errors(report).join('\n')).toMatch(/both superblock copies are damaged \(copy 0: stateChangedAt out of range; copy 1: stateChangedAt out of range\)/);
    const recorder = new MutationRecorder(store);
    await expect(Volume.open(recorder)).rejects.toMatchObject({ code: 'CLDD_CORRUPT' });
    expect(recorder.mutations).toEqual([]);
  });

  test('both_superblock_copies_damaged_is_an_error', async () => {
    const { store } = await withRedirects();
    flipByte(store, superblockOffset(0, BS) + 40);
    flipByte(store, superblockOffset(1, BS) + 300);
    const report = await checkReadOnly(store);
    expect(report.clean).toBe(false);
    expect(report.foreign).toBe(false);
    expect(report.superblock).toBeNull();
    expect(errors(report).join('\n')).toMatch(/both superblock copies are damaged/);
  });

  test('superblock_copies_of_two_different_stores_are_an_error', async () => {
    const { store } = await formatted();
    const other = await formatted();
    const copy1 = new Uint8Array(BS);
    other.store.readSync(copy1, superblockOffset(1, BS));
    store.writeSync(copy1, superblockOffset(1, BS));
    const report = await checkReadOnly(store);
    expect(report.clean).toBe(false);
    expect(errors(report).join('\n')).toMatch(/belong to different stores/);
    // Open agrees: which store this is needs a person, not a guess; it writes nothing.
    const recorder = new MutationRecorder(store);
    await expect(Volume.open(recorder)).rejects.toMatchObject({ code: 'CLDD_CORRUPT', message: expect.stringMatching(/belong to different stores/) });
    expect(recorder.mutations).toEqual([]);
  });

  test('a_map_page_with_no_valid_slot_is_an_error_naming_it', async () => {
    // Three map pages; damage both slots of page 1.
    const store = new MemoryStore(600 * MiB);
    const volume = await Volume.format(store, { blockSize: BS });
    expect(volume.layout.mapPages).toBe(3);
    await volume.close();
    flipByte(store, mapSlotOffset(volume.layout, 1, 0) + 100);
    store.writeSync(encodeMapSlot(volume.layout, volume.superblock.uuid, 1, 2, null).fill(0x33, 2000, 2100), mapSlotOffset(volume.layout, 1, 1));
    const guard = new MutationRecorder(store);
    const report = await check(guard);
    expect(guard.mutations).toEqual([]);
    expect(report.clean).toBe(false);
    const errs = errors(report);
    expect(errs).toHaveLength(1);
    expect(errs[0]).toMatch(/map page 1 has no valid copy \(slot 0: checksum mismatch; slot 1: checksum mismatch\)/);
  });

  test('a_plain_state_with_redirected_bits_is_an_error', async () => {
    const { store, volume } = await formatted();
    await volume.close();
    // A commit of page 0 with two bits set, although the state is plain.
    const payload = new Uint8Array(BS - MAP_SLOT_HEADER);
    payload[0] = 0b101;
    await commitPage(store, 0, payload);
    const report = await checkReadOnly(store);
    expect(report.clean).toBe(false);
    expect(errors(report)).toEqual(['the state is plain but 2 blocks are marked redirected']);
    expect(report.redirected).toBe(2);
  });

  test('bits_beyond_the_last_block_are_an_error', async () => {
    const { store, volume } = await withRedirects();
    const { layout } = volume;
    const payload = new Uint8Array(BS - MAP_SLOT_HEADER);
    const beyond = layout.blocks; // the first bit past the end (one page here)
    payload[beyond >> 3] |= 1 << (beyond & 7);
    await commitPage(store, 0, payload);
    const report = await checkReadOnly(store);
    expect(report.clean).toBe(false);
    expect(errors(report).join('\n')).toMatch(new RegExp(`marks block ${beyond}, beyond the last block`));
  });

  test('a_truncated_store_is_an_error', async () => {
    const { store } = await withRedirects();
    const short = new MemoryStore(store.size - MiB);
    const buf = new Uint8Array(short.size);
    store.readSync(buf, 0);
    short.writeSync(buf, 0);
    const report = await checkReadOnly(short);
    expect(report.clean).toBe(false);
    expect(errors(report).join('\n')).toMatch(new RegExp(`has ${short.size} bytes but was formatted with ${store.size}: it was truncated`));
  });

  test('a_grown_store_is_clean', async () => {
    const { store } = await withRedirects();
    const big = new MemoryStore(store.size + 5 * MiB);
    const buf = new Uint8Array(store.size);
    store.readSync(buf, 0);
    big.writeSync(buf, 0);
    const report = await checkReadOnly(big);
    expect(report.findings).toEqual([]);
    expect(report.redirected).toBe(2);
  });

  test('a_foreign_store_is_not_a_cldd_store', async () => {
    const seed = seedFromEnv();
    console.log(`check foreign seed: ${seed} (replay with CLDD_SEED=${seed})`);
    const random = rng(seed);
    const noise = new MemoryStore(4 * MiB);
    const words = new Uint32Array(MiB / 4);
    for (let i = 0; i < words.length; i++) words[i] = Math.floor(random() * 0x100000000);
    noise.writeSync(new Uint8Array(words.buffer), 0);
    for (const store of [new MemoryStore(4 * MiB), noise, new MemoryStore(100)]) {
      const report = await checkReadOnly(store);
      expect(report.clean).toBe(false);
      expect(report.foreign).toBe(true);
      expect(report.superblock).toBeNull();
      expect(errors(report).join('\n')).toMatch(/not a cldd store/);
    }
  });

  test('check_never_writes_even_on_damaged_stores', async () => {
    const seed = seedFromEnv();
    console.log(`check damage seed: ${seed} (replay with CLDD_SEED=${seed})`);
    const random = rng(seed);
    const { store, volume } = await withRedirects();
    for (let i = 0; i < 25; i++) {
      const image = MemoryStore.copyOf(store);
      const hits = 1 + Math.floor(random() * 4);
      for (let k = 0; k < hits; k++) {
        // Damage where every byte counts: a superblock's defined sector or a map slot of page 0.
        const at =
          random() < 0.5
            ? superblockOffset(Math.floor(random() * 2), BS) + Math.floor(random() * 512)
            : mapSlotOffset(volume.layout, 0, 0) + Math.floor(random() * 2 * BS);
        flipByte(image, at);
      }
      const report = await checkReadOnly(image);
      // Damage is reported, never thrown; clean means no errors.
      expect(report.clean, `[seed ${seed}] damage ${i}`).toBe(errors(report).length === 0);
    }
  });

  test('check_of_the_superblock_rewritten_with_a_foreign_uuid_map_is_an_error', async () => {
    // The superblocks of a fresh format over an old map: every old slot belongs to another store.
    const { store, volume } = await withRedirects();
    const other = await formatted(4 * MiB, BS, 2);
    const sb = encodeSuperblock({ ...other.volume.superblock, generation: 50 });
    store.writeSync(sb, superblockOffset(0, BS));
    store.writeSync(sb, superblockOffset(1, BS));
    const report = await checkReadOnly(store);
    expect(report.clean).toBe(false);
    expect(errors(report).join('\n')).toMatch(/map page 0 has no valid copy \(slot 0: belongs to another store; slot 1: belongs to another store\)/);
    expect(volume.layout).toEqual(other.volume.layout);
  });
});
