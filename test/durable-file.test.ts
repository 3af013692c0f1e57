/**
 * Files that must survive whole (the pair configuration and systemd unit in /etc, backup
 * records) are replaced, never rewritten in place: a write cut short leaves the old file.
 */
import { spawnSync } from 'node:child_process';
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, expect, test } from 'vitest';
import { replaceFileDurably } from '../src/durable-file.js';
import { dist, underFileLimit } from './support/file-limit.js';

let dir: string;
beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), 'cldd-durable-'));
});
afterEach(async () => {
  await rm(dir, { recursive: true, force: true });
});

test('replaces the content and leaves nothing else beside it', async () => {
  const path = join(dir, 'a.conf');
  await writeFile(path, 'BACKING=/old\n');
  await replaceFileDurably(path, 'BACKING=/dev/disk/by-id/ata-DISK-part1\n', 0o644, 'the pair configuration');
  expect(await readFile(path, 'utf8')).toBe('BACKING=/dev/disk/by-id/ata-DISK-part1\n');
  expect(await readdir(dir)).toEqual(['a.conf']);
});

test('a write the file system cuts short leaves the old file whole, and says which file', async () => {
  // A child whose files may hold 32 bytes replaces a file of 13 with one of 39: the write stops
  // at 32 (EFBIG here, ENOSPC on a full disk). In place, that left BACKING=/dev/disk/by-id/ata-DIS.
  const path = join(dir, 'a.conf');
  await writeFile(path, 'BACKING=/old\n');
  const script = `
    import { replaceFileDurably } from ${dist('durable-file.js')};
    replaceFileDurably(process.argv[1], 'BACKING=/dev/disk/by-id/ata-DISK-part1\\n', 0o644, 'the pair configuration').then(
      () => console.log('written'),
      (err) => console.log(err.code, err.message),
    );`;
  expect(await underFileLimit(32, script, path)).toBe(`EFBIG write the pair configuration ${path}: EFBIG: file too large, write`);
  expect(await readFile(path, 'utf8')).toBe('BACKING=/old\n');
  expect(await readdir(dir)).toEqual(['a.conf']);
});

test('a failure before the rename removes nothing but its own temporary file', async () => {
  const path = join(dir, 'cldd@.service');
  await writeFile(path, '[Service]\n');
  // Something in the temporary file's place: its open fails.
  await mkdir(join(dir, `.cldd@.service.${process.pid}.tmp`));
  await expect(replaceFileDurably(path, '[Unit]\n', 0o644, 'the systemd unit')).rejects.toMatchObject({
    code: 'EISDIR',
    message: expect.stringContaining(`write the systemd unit ${path}: `),
  });
  expect(await readFile(path, 'utf8')).toBe('[Service]\n');
});

test("a killed process's temporary file is removed by the next replacement; a running one's is left alone", async () => {
  const path = join(dir, 'a.conf');
  await writeFile(path, 'BACKING=/old\n');
  // A child that has exited: its pid is free (or, rarely, reused: then its file stays, clutter only).
  const gone = spawnSync(process.execPath, ['-e', 'console.log(process.pid)'], { encoding: 'utf8' });
  const dead = `.a.conf.${Number(gone.stdout)}.tmp`;
  const alive = `.a.conf.${process.ppid}.tmp`;
  for (const name of [dead, alive, '.a.conf.x.tmp', '.b.conf.1.tmp']) await writeFile(join(dir, name), 'BACKING=/dev/sd');
  await replaceFileDurably(path, 'BACKING=/new\n', 0o644, 'the pair configuration');
  expect((await readdir(dir)).sort()).toEqual([alive, '.a.conf.x.tmp', '.b.conf.1.tmp', 'a.conf'].sort());
});
