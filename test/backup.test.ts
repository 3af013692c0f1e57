/**
 * The backup's parts on files: the copy (full and sparse, incremental with the digest kept up
 * to date), the verification, the record beside TARGET, and the decision what to do with a
 * TARGET. The whole command on a live pair runs in the VM (ublk-vm-checks.sh backup).
 */
import { mkdtemp, open, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { decide, type TargetFacts } from '../src/backup/decide.js';
import { copyImage, imageDigest, REGION, verifyImage } from '../src/backup/image-copy.js';
import { dist, underFileLimit } from './support/file-limit.js';
import { readRecord, recordPath, writeRecord } from '../src/backup/record.js';

const MiB = 1 << 20;
let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'cldd-backup-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

/** Byte for byte (Buffer.equals: a deep equality of 5 MiB takes vitest half a minute). */
const sameFiles = async (a: string, b: string) => (await readFile(a)).equals(await readFile(b));

/** A 5 MiB + 12 KiB image (the last region is short) with data in a few regions only. */
async function image(path: string, fill: [number, number, number][]): Promise<number> {
  const size = 5 * MiB + 12 * 1024;
  const fh = await open(path, 'w');
  await fh.truncate(size);
  for (const [offset, length, value] of fill) await fh.write(Buffer.alloc(length, value), 0, length, offset);
  await fh.close();
  return size;
}

describe('image copy', () => {
  test('a full copy to a new file writes only the regions with data, and its digest is the image digest', async () => {
    const source = join(dir, 'slave-1');
    const target = join(dir, 'full.img');
    const size = await image(source, [
      [0, 4096, 1],
      [3 * MiB + 5, 100, 2],
      [5 * MiB + 8192, 4096, 3],
    ]);
    const progress: number[] = [];
    const r = await copyImage({ source, target, targetIsBlockDevice: false, size, extents: null, onProgress: (p) => progress.push(p.done) });
    expect(await sameFiles(target, source)).toBe(true);
    expect(r.bytesCopied).toBe(size);
    expect(r.bytesWritten).toBe(2 * REGION + (size % REGION));
    expect((await stat(target)).blocks * 512, 'the zero regions are holes').toBeLessThan(MiB);
    expect(progress[progress.length - 1]).toBe(size);
    expect(r.digest).toBe(await imageDigest(target, size));
  });

  test('a paced copy never goes faster than its rate', async () => {
    const source = join(dir, 'slave-paced');
    const target = join(dir, 'paced.img');
    const size = await image(source, [[0, 4 * MiB, 5]]);
    const started = performance.now();
    await copyImage({ source, target, targetIsBlockDevice: false, size, extents: null, rate: 8 * MiB });
    // Each 1 MiB piece after the first waits until the bytes before it fit 8 MiB/s: at least
    // 3/8 s in all, however fast the machine (a lower bound only).
    expect(performance.now() - started).toBeGreaterThanOrEqual(370);
    expect(await sameFiles(target, source)).toBe(true);
  });

  test('an incremental copy of the changed extents brings TARGET to the new image and updates the digest', async () => {
    const source = join(dir, 'slave-2');
    const target = join(dir, 'incr.img');
    const size = await image(source, [[0, 3 * MiB, 7]]);
    const base = await copyImage({ source, target, targetIsBlockDevice: false, size, extents: null });
    // The next snapshot: two regions and the short last one changed.
    const fh = await open(source, 'r+');
    await fh.write(Buffer.alloc(10, 9), 0, 10, REGION + 3);
    await fh.write(Buffer.alloc(REGION, 0), 0, REGION, 2 * MiB); // zeros over data must be copied too
    await fh.write(Buffer.alloc(5, 4), 0, 5, size - 5);
    await fh.close();
    const extents: [number, number][] = [
      [REGION, REGION],
      [2 * MiB, REGION],
      [size - (size % REGION), size % REGION],
    ];
    const r = await copyImage({ source, target, targetIsBlockDevice: false, size, extents, baseDigest: base.digest });
    expect(r.bytesCopied).toBe(2 * REGION + (size % REGION));
    expect(await sameFiles(target, source)).toBe(true);
    expect(r.digest).toBe(await imageDigest(target, size));
    expect(r.digest).not.toBe(base.digest);
    await verifyImage({ source, target, size, digest: r.digest });
  });

  test('a TARGET the file system cannot make as long as the image is refused with its name', async () => {
    // A child whose files may hold 1 MiB copies the 5 MiB image in full (EFBIG; ext4 past 16 TiB).
    const source = join(dir, 'long.img');
    const size = await image(source, [[0, 4096, 1]]);
    const target = join(dir, 'long-target.img');
    const script = `
      import { copyImage } from ${dist('backup', 'image-copy.js')};
      copyImage({ source: process.argv[1], target: process.argv[2], targetIsBlockDevice: false, size: ${size}, extents: null }).then(
        () => console.log('copied'),
        (err) => console.log(err.code, err.message),
      );`;
    expect(await underFileLimit(MiB, script, source, target)).toMatch(new RegExp(`^EFBIG make ${target} ${size} bytes long: `));
  });

  test('extents that are not whole regions are refused before anything is written', async () => {
    const source = join(dir, 'slave-3');
    const size = await image(source, []);
    await expect(copyImage({ source, target: join(dir, 'never.img'), targetIsBlockDevice: false, size, extents: [[4096, REGION]], baseDigest: '0' })).rejects.toMatchObject({ code: 'EINVAL' });
    await expect(stat(join(dir, 'never.img'))).rejects.toMatchObject({ code: 'ENOENT' });
  });

  test('verify finds a byte that differs, and a TARGET whose digest is not the recorded one', async () => {
    const source = join(dir, 'slave-4');
    const target = join(dir, 'verify.img');
    const size = await image(source, [[MiB, 10, 5]]);
    const r = await copyImage({ source, target, targetIsBlockDevice: false, size, extents: null });
    await expect(verifyImage({ source, target, size, digest: '0'.repeat(64) })).rejects.toThrow(/the record says/);
    const fh = await open(target, 'r+');
    await fh.write(Buffer.from([0xee]), 0, 1, 4 * MiB + 17);
    await fh.close();
    await expect(verifyImage({ source, target, size, digest: r.digest })).rejects.toThrow(`differs from the slave at byte ${4 * MiB + 17}`);
  });
});

describe('backup record', () => {
  test('is written durably and read back; anything else beside TARGET is unreadable, not a backup', async () => {
    const target = join(dir, 'rec.img');
    const path = recordPath(target, false);
    expect(path).toBe(`${target}.cldd-backup`);
    expect(await readRecord(path)).toEqual({ kind: 'none' });
    const fields = { uuid: 'ab'.repeat(16), pair: 'home', snapshot: 3, complete: true, size: 4096, digest: 'cd'.repeat(32), enabledByBackup: true };
    await writeRecord(path, fields);
    expect(await readRecord(path)).toMatchObject({ kind: 'ok', record: fields });
    await writeFile(path, '{"format":"cldd-backup","version":1,"uuid":"x"}');
    expect(await readRecord(path)).toEqual({ kind: 'unreadable', reason: 'a field is missing or malformed' });
    await writeFile(path, 'hello');
    expect(await readRecord(path)).toEqual({ kind: 'unreadable', reason: 'not JSON' });
    // A record that says complete without a digest is not taken for one.
    await writeFile(path, JSON.stringify({ format: 'cldd-backup', version: 1, ...fields, digest: '' }));
    expect((await readRecord(path)).kind).toBe('unreadable');
  });
});

describe('what backup does with a TARGET', () => {
  const pair = { name: 'home', uuid: 'ab'.repeat(16), snapshot: 5, capacity: 8 * MiB };
  const held = (snapshot: number, extra: Partial<TargetFacts> = {}, record: object = {}): TargetFacts => ({
    path: '/b/home.img',
    exists: true,
    isBlockDevice: false,
    size: 8 * MiB,
    blank: false,
    record: {
      kind: 'ok',
      record: {
        format: 'cldd-backup',
        version: 1,
        uuid: pair.uuid,
        pair: 'home',
        snapshot,
        complete: true,
        size: 8 * MiB,
        digest: 'cd'.repeat(32),
        enabledByBackup: false,
        updatedAt: '',
        ...record,
      },
    },
    ...extra,
  });
  const code = (fn: () => unknown) => {
    try {
      fn();
    } catch (err) {
      return `${(err as { code: string }).code}: ${(err as Error).message}`;
    }
    return 'no error';
  };

  test('the previous snapshot gives an incremental copy; this one, nothing to do', () => {
    expect(decide(held(4), pair, false)).toMatchObject({ kind: 'incremental', base: { snapshot: 4 } });
    expect(decide(held(5), pair, false)).toMatchObject({ kind: 'current' });
    // Older snapshots go to the daemon, which says whether it still knows the changes.
    expect(decide(held(2), pair, false)).toMatchObject({ kind: 'incremental', base: { snapshot: 2 } });
  });

  test('a new or empty target gets a full copy; an interrupted backup is redone in full', () => {
    expect(decide({ path: '/b/x', exists: false, isBlockDevice: false, size: 0, blank: true, record: { kind: 'none' } }, pair, false)).toMatchObject({ kind: 'full' });
    expect(decide(held(5, {}, { complete: false, digest: '' }), pair, false)).toMatchObject({ kind: 'full', why: expect.stringMatching(/interrupted/) });
    // Stopped before its first write, or mid-copy: the file is no longer than its furthest write.
    for (const size of [0, 3 * MiB]) {
      expect(decide(held(5, { size }, { complete: false, digest: '' }), pair, false)).toMatchObject({ kind: 'full', why: expect.stringMatching(/interrupted/) });
    }
    // Longer than the image it was becoming: not what the interrupted copy left.
    expect(code(() => decide(held(5, { size: 8 * MiB + 1 }, { complete: false, digest: '' }), pair, false))).toMatch(/^CLDD_CORRUPT: .*is not the image it was/);
  });

  test('foreign data, another pair, a damaged record, a size that changed or a newer snapshot are refused without --full', () => {
    const foreign: TargetFacts = { path: '/b/x', exists: true, isBlockDevice: false, size: 100, blank: false, record: { kind: 'none' } };
    expect(code(() => decide(foreign, pair, false))).toMatch(/^CLDD_FOREIGN: .*not a cldd backup.*--full/);
    expect(code(() => decide(held(4, {}, { uuid: 'ef'.repeat(16), pair: 'mail' }), pair, false))).toMatch(/^CLDD_FOREIGN: .*another pair \("mail"/);
    expect(code(() => decide({ ...foreign, record: { kind: 'unreadable', reason: 'not JSON' } }, pair, false))).toMatch(/^CLDD_CORRUPT: .*not JSON/);
    expect(code(() => decide(held(4, { size: 8 * MiB + 1 }), pair, false))).toMatch(/^CLDD_CORRUPT: .*is not the image it was/);
    expect(code(() => decide(held(6), pair, false))).toMatch(/^CLDD_STATE: .*newer than the enabled snapshot 5/);
    for (const t of [foreign, held(4, {}, { uuid: 'ef'.repeat(16) }), held(6)]) expect(decide(t, pair, true)).toMatchObject({ kind: 'full' });
  });

  test('a block device smaller than the image is refused even with --full', () => {
    const device: TargetFacts = { path: '/dev/sdz', exists: true, isBlockDevice: true, size: MiB, blank: true, record: { kind: 'none' } };
    expect(code(() => decide(device, pair, true))).toMatch(/^ENOSPC/);
    expect(decide({ ...device, size: 16 * MiB }, pair, false)).toMatchObject({ kind: 'full' });
  });
});
