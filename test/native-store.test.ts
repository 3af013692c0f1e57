/**
 * Tier 2: the io_uring-backed NativeStore on regular files. It must behave as FileStore does
 * (the engine cannot tell them apart), so the same behaviours run against both.
 */
import { execFile } from 'node:child_process';
import { mkdtemp, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { Disk } from './support/disk.js';
import { ResyncScheduler } from '../src/engine/resync.js';
import { Volume } from '../src/engine/volume.js';
import { type BlockStore, FLUSH } from '../src/io/block-store.js';
import { FileStore } from '../src/io/file-store.js';
import { NativeStore } from '../src/io/native-store.js';
import { stamped, versionOf } from './support/stamp.js';

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'cldd-native-store-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

async function backing(name: string, size: number): Promise<string> {
  const path = join(dir, name);
  await writeFile(path, new Uint8Array(0));
  const { truncate } = await import('node:fs/promises');
  await truncate(path, size);
  return path;
}

const implementations: [string, (path: string) => Promise<BlockStore>][] = [
  ['FileStore', (path) => FileStore.open(path)],
  ['NativeStore', async (path) => NativeStore.open(path)],
];

describe.each(implementations)('%s behaviours', (name, open) => {
  test('round trip of stamped sectors, across several concurrent writes', async () => {
    const store = await open(await backing(`${name}-rt`, 1 << 20));
    const writes = [];
    for (let i = 0; i < 16; i++) writes.push(store.write(stamped(i * 8, 8, 3), i * 8 * 512));
    await Promise.all(writes);
    const back = new Uint8Array(128 * 512);
    await store.read(back, 0);
    for (let s = 0; s < 128; s++) expect(versionOf(back, s * 512, s)).toBe(3);
    await store.close();
  });

  test('zero reads back zeros, the neighbours stay', async () => {
    const store = await open(await backing(`${name}-zero`, 1 << 20));
    await store.write(stamped(0, 64, 1), 0);
    await store.zero(8 * 4096 / 8, 4096 * 2);
    const back = new Uint8Array(64 * 512);
    await store.read(back, 0);
    for (let s = 0; s < 64; s++) {
      const zeroed = s * 512 >= 4096 && s * 512 < 4096 * 3;
      expect(versionOf(back, s * 512, s)).toBe(zeroed ? 0 : 1);
    }
    await store.close();
  });

  test('flush succeeds and the data is in the file', async () => {
    const path = await backing(`${name}-flush`, 1 << 20);
    const store = await open(path);
    await store.write(stamped(100, 4, 9), 100 * 512);
    await store.flush();
    await store.close();
    const check = await FileStore.open(path, { readOnly: true });
    const back = new Uint8Array(4 * 512);
    await check.read(back, 100 * 512);
    for (let s = 0; s < 4; s++) expect(versionOf(back, s * 512, 100 + s)).toBe(9);
    await check.close();
  });

  test('ranges outside the store are refused with EINVAL; a closed store with CLDD_CLOSED', async () => {
    const store = await open(await backing(`${name}-range`, 65536));
    expect(store.size).toBe(65536);
    await expect(store.read(new Uint8Array(512), 65536)).rejects.toMatchObject({ code: 'EINVAL' });
    await expect(store.write(new Uint8Array(1024), 65536 - 512)).rejects.toMatchObject({ code: 'EINVAL' });
    await expect(store.zero(-512, 512)).rejects.toMatchObject({ code: 'EINVAL' });
    await store.close();
    await store.close();
    await expect(store.read(new Uint8Array(512), 0)).rejects.toMatchObject({ code: 'CLDD_CLOSED' });
  });

  test('a missing file is ENOENT naming the path; a directory is EINVAL', async () => {
    const missing = join(dir, 'no-such-file');
    await expect(open(missing)).rejects.toMatchObject({ code: 'ENOENT', message: expect.stringContaining(missing) });
    await expect(open(dir)).rejects.toMatchObject({ code: 'EINVAL' });
  });

  test('the engine formats, writes and reopens through it', async () => {
    const path = await backing(`${name}-engine`, 8 << 20);
    let store = await open(path);
    let volume = await Volume.format(store, { name: 'native' });
    let disk = new Disk(volume);
    await disk.write(0, stamped(0, 16, 5));
    await volume.enable();
    await disk.write(0, stamped(0, 8, 6), { fua: true });
    await volume.close();
    await store.close();
    store = await open(path);
    volume = await Volume.open(store);
    disk = new Disk(volume);
    const master = await disk.read(0, 16 * 512);
    const slave = await disk.read(0, 16 * 512, 'slave');
    for (let s = 0; s < 16; s++) {
      expect(versionOf(master, s * 512, s)).toBe(s < 8 ? 6 : 5);
      expect(versionOf(slave, s * 512, s)).toBe(5);
    }
    await volume.close();
    await store.close();
  });
});

describe('NativeStore specifics', () => {
  test('a second open with the lock is refused with EBUSY; the lock goes with close', async () => {
    const path = await backing('lock', 65536);
    const first = NativeStore.open(path, { lock: true });
    expect(() => NativeStore.open(path, { lock: true })).toThrow(expect.objectContaining({ code: 'EBUSY', message: expect.stringContaining('already attached') }));
    await first.close();
    const second = NativeStore.open(path, { lock: true });
    await second.close();
  });

  test('zero punches a hole (the file gives its space back)', async () => {
    const path = await backing('punch', 4 << 20);
    const store = NativeStore.open(path);
    await store.write(new Uint8Array(4 << 20).fill(7), 0);
    await store.flush();
    const before = (await stat(path)).blocks;
    await store.zero(0, 4 << 20);
    await store.flush();
    const after = (await stat(path)).blocks;
    expect(after).toBeLessThan(before);
    await store.close();
  });

  test('run executes a batch of read, write and zero ops on one buffer', async () => {
    const path = await backing('run', 1 << 20);
    const store = NativeStore.open(path);
    await store.write(stamped(0, 32, 2), 0);
    const buffer = new Uint8Array(16 * 512);
    await store.run(
      [
        { kind: 'read', offset: 0, length: 8 * 512, bufferOffset: 8 * 512 },
        { kind: 'read', offset: 8 * 512, length: 8 * 512, bufferOffset: 0 },
        { kind: 'zero', offset: 16 * 512, length: 4096, bufferOffset: 0 },
      ],
      buffer,
    );
    for (let s = 0; s < 8; s++) expect(versionOf(buffer, s * 512, 8 + s)).toBe(2);
    for (let s = 0; s < 8; s++) expect(versionOf(buffer, (8 + s) * 512, s)).toBe(2);
    await store.run([{ kind: 'write', offset: 64 * 512, length: 16 * 512, bufferOffset: 0 }], buffer);
    const back = new Uint8Array(32 * 512);
    await store.read(back, 16 * 512);
    for (let s = 0; s < 8; s++) expect(versionOf(back, s * 512, 16 + s)).toBe(0);
    for (let s = 8; s < 16; s++) expect(versionOf(back, s * 512, 16 + s)).toBe(2);
    await store.read(back.subarray(0, 16 * 512), 64 * 512);
    for (let s = 0; s < 8; s++) expect(versionOf(back, s * 512, 8 + s)).toBe(2);
    await expect(store.run([{ kind: 'read', offset: 0, length: 1024, bufferOffset: 15 * 512 }], buffer)).rejects.toMatchObject({ code: 'EINVAL' });
    await store.close();
  });

  test('sequence runs writes and flushes one after another', async () => {
    const path = await backing('sequence', 1 << 20);
    const store = NativeStore.open(path);
    // Two writes to one place: the second starts after the first completed, so it wins.
    await store.sequence([
      { kind: 'write', data: stamped(0, 8, 1), offset: 0 },
      { kind: 'write', data: stamped(8, 8, 1), offset: 8 * 512 },
      FLUSH,
      { kind: 'write', data: stamped(0, 8, 2), offset: 0 },
      FLUSH,
    ]);
    const back = new Uint8Array(16 * 512);
    await store.read(back, 0);
    for (let s = 0; s < 16; s++) expect(versionOf(back, s * 512, s)).toBe(s < 8 ? 2 : 1);
    await store.sequence([]);
    // Checked before anything runs: the first write is not made either.
    await expect(store.sequence([{ kind: 'write', data: stamped(0, 8, 3), offset: 0 }, { kind: 'write', data: new Uint8Array(512), offset: 1 << 20 }])).rejects.toMatchObject({ code: 'EINVAL' });
    await store.read(back, 0);
    expect(versionOf(back, 0, 0)).toBe(2);
    await store.close();
    await expect(store.sequence([FLUSH])).rejects.toMatchObject({ code: 'CLDD_CLOSED' });
  });

  test("copy runs a merge's reads, then its writes, one after another", async () => {
    const path = await backing('copy', 1 << 20);
    const store = NativeStore.open(path);
    await store.write(stamped(0, 64, 1), 0);
    const buffer = new Uint8Array(16 * 512);
    // Runs of (from, to, length, buffer offset). The write to sectors 8-15 comes after every
    // read: the second run's read still finds version 1 there, though the first run writes it.
    await store.copy(Float64Array.of(0, 8 * 512, 8 * 512, 0, 8 * 512, 16 * 512, 8 * 512, 8 * 512), buffer);
    const back = new Uint8Array(24 * 512);
    await store.read(back, 0);
    for (let s = 0; s < 8; s++) expect(versionOf(back, s * 512, s)).toBe(1);
    for (let s = 0; s < 8; s++) expect(versionOf(back, (8 + s) * 512, s)).toBe(1);
    for (let s = 0; s < 8; s++) expect(versionOf(back, (16 + s) * 512, 8 + s)).toBe(1);
    // Checked before anything runs: runs that do not fit the buffer and read what another
    // writes (copied a buffer-full at a time, the second would read what the first wrote), or a
    // write past the store, make no read or write at all.
    await store.write(stamped(32, 8, 2), 32 * 512);
    await expect(store.copy(Float64Array.of(32 * 512, 0, 8 * 512, 0, 0, 40 * 512, 8 * 512, 8 * 512), buffer.subarray(0, 8 * 512))).rejects.toMatchObject({
      code: 'EINVAL',
      message: expect.stringContaining('a run reads what another writes, and the runs do not fit the 4096-byte buffer'),
    });
    await expect(store.copy(Float64Array.of(0, 0, 512, 0, 0, 1 << 20, 512, 0), buffer)).rejects.toMatchObject({ code: 'EINVAL', message: expect.stringContaining('run 1 is outside') });
    // The addon checks each number: a read past the store, negative, fractional, NaN, a last run cut short.
    for (const bad of [[1 << 20, 0, 512, 0], [-512, 0, 512, 0], [0, 0, 0.5, 0], [0, 0, 512, NaN], [0, 0, 512, 0, 0]]) {
      await expect(store.copy(Float64Array.of(0, 32 * 512, 512, 0, ...bad), buffer), `${bad}`).rejects.toMatchObject({ code: 'EINVAL' });
    }
    await store.read(back.subarray(0, 8 * 512), 32 * 512);
    for (let s = 0; s < 8; s++) expect(versionOf(back, s * 512, 32 + s)).toBe(2);
    await store.read(back.subarray(0, 8 * 512), 0);
    for (let s = 0; s < 8; s++) expect(versionOf(back, s * 512, s)).toBe(1);
    await expect(store.copy(Float64Array.of(0, 32 * 512, 512, 0), new Uint8Array(0))).rejects.toMatchObject({ code: 'EINVAL', message: expect.stringContaining('the buffer is empty') });
    // A read that finds the end of a file that shrank underneath fails the copy before its write.
    const { truncate } = await import('node:fs/promises');
    await truncate(path, 40 * 512);
    await expect(store.copy(Float64Array.of(36 * 512, 0, 8 * 512, 0), buffer)).rejects.toMatchObject({ code: 'EIO', message: expect.stringContaining('end of file') });
    await store.read(back.subarray(0, 8 * 512), 0);
    for (let s = 0; s < 8; s++) expect(versionOf(back, s * 512, s)).toBe(1);
    await store.close();
    await expect(store.copy(new Float64Array(0), buffer)).rejects.toMatchObject({ code: 'CLDD_CLOSED' });
  });

  test.each([
    ['in the kernel', false],
    ['through the buffer, where a run reads what another writes', true],
  ])('copy punches the destination under a source hole of 256 KiB or more, and copies the rest: %s', async (_, overlap) => {
    // Source pages (4 KiB) 0-199 written, then 8-71 (256 KiB) and 100-101 (8 KiB) punched, as a
    // discard in a snapshot punches the change area; pages 960-1023 never written, a hole to the
    // end of the file. Destination pages 512-863 written before.
    const page = 4096;
    const path = await backing(`copy-holes-${overlap}`, 1024 * page);
    const store = NativeStore.open(path);
    await store.write(stamped(0, (200 * page) / 512, 1), 0);
    await store.write(stamped((512 * page) / 512, (352 * page) / 512, 5), 512 * page);
    await store.zero(8 * page, 64 * page);
    await store.zero(100 * page, 2 * page);
    await store.flush();
    const before = (await stat(path)).blocks;
    const buffer = new Uint8Array(353 * page).fill(0xee);
    // Pages 0-199 to 512-711, 960-1023 to 712-775, 120-125 (all data) to 776-781, 8-71 (all
    // hole, but run in two: 32 and 32 pages) to 782-845, 100-101 (a short hole) to 846-847. A
    // merge's runs never read what another writes, and go through the kernel (copy_file_range);
    // with one more that does (page 512, which the first run writes, to 850), every run is read
    // before any is written, through the buffer.
    const runs = [
      [0, 512, 200],
      [960, 712, 64],
      [120, 776, 6],
      [8, 782, 32],
      [40, 814, 32],
      [100, 846, 2],
      ...(overlap ? [[512, 850, 1]] : []),
    ];
    const records = new Float64Array(runs.length * 4);
    let at = 0;
    runs.forEach(([from, to, n], i) => {
      records.set([from * page, to * page, n * page, at * page], i * 4);
      at += n;
    });
    await store.copy(records, buffer);
    await store.flush();
    if (overlap) {
      // The holes punched were zeroed in the buffer too (where a punch is refused, the zeros in
      // it are written instead); page 850 got page 512 as it was before the copy.
      for (const [from, to] of [[8 * page, 72 * page], [200 * page, 264 * page]]) {
        expect(buffer.subarray(from, to).every((b) => b === 0)).toBe(true);
      }
      const moved = new Uint8Array(page);
      await store.read(moved, 850 * page);
      expect(versionOf(moved, 0, 512 * 8)).toBe(5);
    }
    const back = new Uint8Array(336 * page);
    await store.read(back, 512 * page);
    const holes = (p: number) => (p >= 8 && p < 72) || p === 100 || p === 101 || p >= 200;
    for (const [from, to, n] of runs.slice(0, 6)) {
      for (let i = 0; i < n; i++) {
        const p = to - 512 + i;
        expect(versionOf(back, p * page, (from + i) * 8), `page ${to + i}`).toBe(holes(from + i) ? 0 : 1);
        expect(versionOf(back, p * page + page - 512, (from + i) * 8 + 7), `page ${to + i}`).toBe(holes(from + i) ? 0 : 1);
      }
    }
    // The destination gave the space of the 64 + 64 hole pages in runs of 256 KiB or more back:
    // the 32-page runs are not asked about, and the short hole is written as zeros. (Punching splits
    // the file's extents; ext4 may take a block or two for the extent tree.)
    const given = (before - (await stat(path)).blocks) / (page / 512);
    expect(given).toBeGreaterThanOrEqual(126);
    expect(given).toBeLessThanOrEqual(128);
    await store.close();
  });

  test.each([
    ['the buffer holds the runs', 64],
    ['the runs go through the buffer in pieces', 5],
  ])('copy fails before writing anything where a run reads past the end of the file: %s', async (_, pages) => {
    const page = 4096;
    const path = await backing(`copy-short-${pages}`, 1024 * page);
    const store = NativeStore.open(path);
    const buffer = new Uint8Array(pages * page);
    // Past the end of a file that shrank under the store is no hole: the read fails there, and
    // nothing is written or punched, not even the first run, whose source is all there.
    const { truncate } = await import('node:fs/promises');
    await truncate(path, 900 * page);
    await store.write(stamped(0, (64 * page) / 512, 7), 600 * page);
    const cut = store.copy(Float64Array.of(0, 600 * page, 8 * page, 0, 880 * page, 608 * page, 56 * page, 8 * page), buffer);
    await expect(cut).rejects.toMatchObject({ code: 'EIO', message: expect.stringContaining('end of file') });
    const back = new Uint8Array(64 * page);
    await store.read(back, 600 * page);
    for (let p = 0; p < 64; p++) expect(versionOf(back, p * page, p * 8), `page ${600 + p}`).toBe(7);
    await store.close();
  });

  // A block device takes no copy_file_range: a merge's runs go through the buffer. Where they do
  // not fit it (a resync's windows are larger than its buffer), a buffer-full at a time, a run
  // split where the buffer ends. A loop device over a file here: root only.
  test.skipIf(process.getuid?.() !== 0)('copy on a block device goes through a buffer shorter than its runs, in pieces', async () => {
    const page = 4096;
    const path = await backing('copy-bounce', 1024 * page);
    const { stdout } = await promisify(execFile)('losetup', ['-f', '--show', path], { timeout: 10_000 });
    const loop = stdout.trim();
    try {
      const store = NativeStore.open(loop);
      expect(store.isBlockDevice).toBe(true);
      await store.write(stamped(0, (300 * page) / 512, 4), 0);
      await store.write(stamped((512 * page) / 512, (300 * page) / 512, 6), 512 * page);
      await store.flush();
      // Runs of 1, 7, 3, 64 (a 256 KiB source, which a block device never reports as a hole)
      // and 2 pages through a 5-page buffer: pieces of 1+4, 3+2, 1+4, then 5 at a time.
      const runs = [
        [10, 600, 1],
        [20, 601, 7],
        [40, 608, 3],
        [100, 611, 64],
        [290, 675, 2],
      ];
      const records = new Float64Array(runs.length * 4);
      let at = 0;
      runs.forEach(([from, to, n], i) => {
        records.set([from * page, to * page, n * page, at * page], i * 4);
        at += n;
      });
      await store.copy(records, new Uint8Array(5 * page));
      await store.flush();
      const back = new Uint8Array(300 * page);
      await store.read(back, 512 * page);
      const copied = new Map<number, number>();
      for (const [from, to, n] of runs) for (let i = 0; i < n; i++) copied.set(to + i, from + i);
      for (let p = 512; p < 812; p++) {
        const source = copied.get(p);
        const want = source === undefined ? [p, 6] : [source, 4];
        expect(versionOf(back, (p - 512) * page, want[0] * 8), `page ${p}`).toBe(want[1]);
        expect(versionOf(back, (p - 512) * page + page - 512, want[0] * 8 + 7), `page ${p}`).toBe(want[1]);
      }
      await store.close();
    } finally {
      await promisify(execFile)('losetup', ['-d', loop], { timeout: 10_000 });
    }
  });

  test('punchesHoles asks with a punch past the end of the file, which changes nothing', async () => {
    const path = await backing('probe', 0);
    const store = NativeStore.open(path);
    // 4.5 KiB: the punch starts at the next 4 KiB boundary, past the last byte.
    await writeFile(path, stamped(0, 9, 1));
    expect(store.punchesHoles()).toBe(true);
    expect((await stat(path)).size).toBe(9 * 512);
    const { readFile } = await import('node:fs/promises');
    const bytes = new Uint8Array(await readFile(path));
    for (let s = 0; s < 9; s++) expect(versionOf(bytes, s * 512, s)).toBe(1);
    await store.close();
    expect(() => store.punchesHoles()).toThrow(expect.objectContaining({ code: 'CLDD_CLOSED' }));
  });

  /** A volume of about `areaBlocks` 4 KiB blocks on a file, every block written (version 1), enabled. */
  async function enabledOnFile(name: string, areaBlocks: number) {
    const path = await backing(name, 2 * areaBlocks * 4096 + (4 << 20));
    const store = NativeStore.open(path);
    const volume = await Volume.format(store);
    const disk = new Disk(volume, store);
    const bs = volume.blockSize;
    const blocks = volume.layout.blocks;
    await disk.write(0, stamped(0, (blocks * bs) / 512, 1));
    await volume.enable();
    return { path, store, volume, disk, bs, blocks };
  }

  test('a resync on a file copies every redirected block back, through copy', async () => {
    const { store, volume, disk, bs, blocks } = await enabledOnFile('resync', 256);
    // Scattered runs of one to three blocks, as random first touches leave them, and one long run.
    const written = new Map<number, number>();
    for (let b = 1; b < blocks - 40; b += 7 + (b % 5)) {
      const n = 1 + (b % 3);
      await disk.write(b * bs, stamped((b * bs) / 512, (n * bs) / 512, 2));
      for (let i = 0; i < n; i++) written.set(b + i, 2);
    }
    await disk.write((blocks - 32) * bs, stamped(((blocks - 32) * bs) / 512, (32 * bs) / 512, 3));
    for (let b = blocks - 32; b < blocks; b++) written.set(b, 3);
    await disk.flush();
    const copies: { runs: number; bytes: number; buffer: number }[] = [];
    const released: Uint8Array[] = [];
    const bytesOf = (runs: Float64Array) => runs.filter((_, i) => i % 4 === 2).reduce((a, b) => a + b, 0);
    const executor = {
      run: store.run.bind(store),
      copy: (runs: Float64Array, b: Uint8Array) => (copies.push({ runs: runs.length / 4, bytes: bytesOf(runs), buffer: b.length }), store.copy(runs, b)),
      releaseBuffer: (b: Uint8Array) => {
        released.push(b);
        store.releaseBuffer(b);
      },
    };
    await volume.disable();
    // Windows of up to 64 redirected blocks, each lane's buffer 8: the copy is not bounded by it.
    // (windowMs long enough that no machine's copy time makes them smaller.)
    await new ResyncScheduler(volume, executor, { runBytes: 16 * bs, windowBytes: 128 * bs, windowMs: 3_600_000, yieldMs: 0 }).start();
    expect(volume.state).toBe('plain');
    // The copy buffer's pages go back once the resync is done: the whole buffer, once.
    expect(released.map((b) => b.length)).toEqual([16 * bs]);
    expect(copies.length).toBeGreaterThan(1);
    expect(Math.max(...copies.map((c) => c.runs))).toBeGreaterThan(1);
    expect(Math.max(...copies.map((c) => c.bytes))).toBe(64 * bs);
    expect(Math.max(...copies.map((c) => c.buffer))).toBe(8 * bs);
    const back = await disk.read(0, blocks * bs);
    for (let b = 0; b < blocks; b++) {
      for (let s = 0; s < bs / 512; s++) expect(versionOf(back, b * bs + s * 512, (b * bs) / 512 + s)).toBe(written.get(b) ?? 1);
    }
    await volume.close();
    await store.close();
  });

  test('a discard in a snapshot gives its space back in the data area too, once resynced', async () => {
    const { path, store, volume, disk, bs, blocks } = await enabledOnFile('resync-discard', 1024);
    // 1 MiB discarded (the change area punched there), a block written on either side of it.
    await disk.write(99 * bs, stamped((99 * bs) / 512, bs / 512, 2));
    await disk.discard(100 * bs, 256 * bs);
    await disk.write(356 * bs, stamped((356 * bs) / 512, bs / 512, 2));
    await disk.flush();
    expect(volume.map.count).toBe(258);
    const allocated = (await stat(path)).blocks;
    await volume.disable();
    await new ResyncScheduler(volume, store, { yieldMs: 0 }).start();
    expect(volume.state).toBe('plain');
    const back = await disk.read(0, blocks * bs);
    for (let b = 0; b < blocks; b++) {
      const want = b >= 100 && b < 356 ? 0 : b === 99 || b === 356 ? 2 : 1;
      expect(versionOf(back, b * bs, (b * bs) / 512), `block ${b}`).toBe(want);
    }
    // The data area's 1 MiB went back to the file system (less a block or two the resync's
    // commit and the extent tree may take); written as zeros it would have been kept.
    expect(allocated - (await stat(path)).blocks).toBeGreaterThanOrEqual(((256 - 4) * bs) / 512);
    await volume.close();
    await store.close();
  });

  test('releaseBuffer gives the whole pages of a buffer back, which then read as zeros', async () => {
    const store = NativeStore.open(await backing('release', 1 << 20));
    const bytes = new Uint8Array(64 * 1024).fill(7);
    store.releaseBuffer(bytes);
    // Only the bytes before the first page boundary and after the last keep their value.
    const first = bytes.indexOf(0);
    const last = bytes.lastIndexOf(0);
    expect(first).toBeGreaterThanOrEqual(0);
    expect(first).toBeLessThan(4096);
    expect(last).toBeGreaterThanOrEqual(bytes.length - 4097);
    expect(bytes.subarray(first, last + 1).every((b) => b === 0)).toBe(true);
    expect(bytes.subarray(0, first).every((b) => b === 7) && bytes.subarray(last + 1).every((b) => b === 7)).toBe(true);
    // The pages are usable again.
    bytes.fill(9);
    expect(bytes.every((b) => b === 9)).toBe(true);
    // A view into a larger buffer shares its pages with bytes that are not the caller's.
    expect(() => store.releaseBuffer(new Uint8Array(64 * 1024).subarray(4096))).toThrow(expect.objectContaining({ code: 'EINVAL' }));
    await store.close();
  });

  test('a failed step rejects naming it, and the steps after it do not run', async () => {
    const path = await backing('sequence-fail', 1 << 20);
    const store = NativeStore.open(path, { readOnly: true });
    const failure = store.sequence([FLUSH, { kind: 'write', data: new Uint8Array(4096), offset: 8192 }, { kind: 'write', data: new Uint8Array(4096), offset: 0 }]);
    await expect(failure).rejects.toMatchObject({ code: 'EBADF', message: expect.stringContaining('write of 4096 bytes at 8192') });
    await store.close();
  });

  test('close waits for a sequence in flight', async () => {
    const path = await backing('sequence-close', 8 << 20);
    const store = NativeStore.open(path);
    const pending = store.sequence([{ kind: 'write', data: new Uint8Array(4 << 20).fill(7), offset: 0 }, FLUSH]);
    await store.close();
    await pending;
    const check = NativeStore.open(path);
    const back = new Uint8Array(4096);
    await check.read(back, (4 << 20) - 4096);
    expect(back.every((b) => b === 7)).toBe(true);
    await check.close();
  });

  test('a read running past the end of a file that shrank underneath is EIO, not a short read', async () => {
    const path = await backing('shrunk', 65536);
    const store = NativeStore.open(path);
    const { truncate } = await import('node:fs/promises');
    await truncate(path, 4096);
    await expect(store.read(new Uint8Array(8192), 0)).rejects.toMatchObject({ code: 'EIO', message: expect.stringContaining('end of file') });
    await store.close();
  });

  test('close waits for the requests in flight', async () => {
    const path = await backing('inflight', 8 << 20);
    const store = NativeStore.open(path);
    const pending = [store.write(new Uint8Array(4 << 20).fill(1), 0), store.read(new Uint8Array(4 << 20), 4 << 20)];
    await store.close();
    await Promise.all(pending);
  });

  test('a process that exits with store I/O in flight, or never closes, exits cleanly', async () => {
    // The environment cleanup hook closes rings and fds; a collected store removes its hook.
    const path = await backing('exit', 8 << 20);
    const addonPath = resolve('build/Release/cldd_native.node');
    const script = `
      const { Store } = require(${JSON.stringify(addonPath)});
      const a = new Store(process.argv[1], false, true);
      new Store(process.argv[1], true, false); // unreferenced: may be collected first
      if (global.gc) global.gc();
      a.write(Buffer.alloc(4 << 20, 1), 0);
      a.read(Buffer.alloc(4 << 20), 4 << 20).then(() => process.exit(3));
      process.exit(0);`;
    const { stdout, stderr } = await promisify(execFile)(process.execPath, ['--expose-gc', '-e', script, path]);
    expect(stdout + stderr).toBe('');
    const idle = `const { Store } = require(${JSON.stringify(addonPath)}); new Store(process.argv[1], false, true);`;
    await promisify(execFile)(process.execPath, ['-e', idle, path], { timeout: 10_000 });
  });
});
