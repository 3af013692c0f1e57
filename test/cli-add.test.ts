/**
 * cldd add's refusals on the host, before any device is involved: every option is checked before
 * a file is created or written, and what is on a backing store decides whether it is reattached,
 * formatted, or refused. A refusal leaves the store byte for byte as it was.
 */
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdtemp, open, readFile, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { prepareBacking } from '../src/cli/backing.js';
import { listSignatures } from '../src/cli/probe.js';
import { Volume } from '../src/engine/volume.js';
import { readSuperblocks } from '../src/format/recovery.js';
import { FileStore } from '../src/io/file-store.js';
import { type Cli, buildCli } from './support/cli.js';
import { dist, underFileLimit } from './support/file-limit.js';

const run = promisify(execFile);
const MiB = 1 << 20;
const SBIN = { PATH: `${process.env.PATH}:/usr/sbin:/sbin` };

let dir: string;

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'cldd-add-'));
});

afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

/** Every byte of a file, as a digest: proves a refusal changed nothing. */
async function digest(path: string): Promise<string> {
  return createHash('sha256').update(await readFile(path)).digest('hex');
}

async function sparseFile(name: string, size: number): Promise<string> {
  const path = join(dir, name);
  const fh = await open(path, 'w', 0o600);
  await fh.truncate(size);
  await fh.close();
  return path;
}

/** A cldd store as cldd add leaves it, optionally with larger blocks (an older cldd allowed them). */
async function cldStore(name: string, options: { blockSize?: number; size?: number; enable?: boolean } = {}): Promise<string> {
  const path = await sparseFile(name, options.size ?? 64 * MiB);
  const store = await FileStore.open(path);
  const volume = await Volume.format(store, { name: 'old', blockSize: options.blockSize });
  if (options.enable) await volume.enable();
  await volume.close();
  await store.close();
  return path;
}

async function storeName(path: string): Promise<{ name: string; blockSize: number }> {
  const store = await FileStore.open(path, { readOnly: true });
  try {
    const { sb } = await readSuperblocks(store);
    return { name: sb.name, blockSize: sb.layout.blockSize };
  } finally {
    await store.close();
  }
}

describe('cldd add checks every option before it touches anything', () => {
  let cli: Cli;
  // As root with a stand-in for the ublk control device, an add that passed its checks would
  // create and format the file before starting the daemon: these must stop before that.
  const env = () => ({ CLDD_UBLK_CONTROL: '/dev/null', CLDD_RUN_DIR: join(dir, 'run') });

  beforeAll(async () => {
    cli = await buildCli();
  });

  afterAll(async () => {
    await cli.remove();
  });

  test.each([
    [['--size', '10G', '--queues', '0'], '--queues "0" is not a whole number from 1 to 64'],
    [['--size', '10G', '--queues', 'abc'], '--queues "abc" is not a whole number from 1 to 64'],
    [['--size', '10G', '--queues', '1.5'], '--queues "1.5" is not a whole number from 1 to 64'],
    [['--size', '10G', '--depth', '0'], '--depth "0" is not a whole number from 1 to 4096'],
    [['--size', '10G', '--depth', '5000'], '--depth "5000" is not a whole number from 1 to 4096'],
    [['--size', '10G', '--poll-us', '10001'], '--poll-us "10001" is not a whole number from 0 to 10000'],
    [['--size', '10G', '--poll-us', '-1'], '--poll-us "-1" is not a whole number from 0 to 10000'],
    [['--size', '-5G'], '--size "-5G" is not a size (examples: 4096, 512M, 20G, 1T)'],
    [['--size', '5X'], '--size "5X" is not a size (examples: 4096, 512M, 20G, 1T)'],
    [['--size', '1G', '--size', '2G'], '--size is given 2 times; give it once'],
    [['--size', '1M'], 'a store of 1048576 bytes is too small: cldd needs at least'],
    [['--size', '10G', '--name', 'Bad Name'], '"Bad Name" is not a valid pair name'],
    [
      ['--size', '10G', '--block-size', '8192'],
      '--block-size "8192" is not allowed: cldd\'s blocks are at least 4096 bytes and a block device\'s blocks are at most the page size (4096 bytes on x86-64), so it must be 4096',
    ],
    [['--size', '10G', '--block-size', '5000'], '--block-size "5000" is not allowed'],
  ])('add %j is refused and creates nothing', async (args, message) => {
    const path = join(dir, 'new.img');
    const r = await cli.run(['add', path, ...args], { env: env() });
    expect(r.code).not.toBe(0);
    expect(r.stderr.split('\n')).toHaveLength(2);
    expect(r.stderr).toContain(message);
    expect(r.stderr).toMatch(/ \[(EINVAL|CLDD_TOO_SMALL)\]\n$/);
    expect(existsSync(path)).toBe(false);
    expect(await readdir(dir)).not.toContain('new.img');
  });

  test('an existing file is left as it was by a refused option', async () => {
    const path = await sparseFile('existing.img', 64 * MiB);
    const before = await digest(path);
    for (const args of [['--block-size', '8192'], ['--queues', '0'], ['--depth', 'x'], ['--poll-us', '1e3']]) {
      const r = await cli.run(['add', path, ...args], { env: env() });
      expect(r.code).not.toBe(0);
      expect(r.stderr).toMatch(/\[EINVAL\]\n$/);
    }
    expect(await digest(path)).toBe(before);
  });
});

describe('what is on the backing store decides', () => {
  test('a cldd store is reattached and nothing is written', async () => {
    const path = await cldStore('plain.img');
    const before = await digest(path);
    expect(await prepareBacking(path, { name: 'x', force: false })).toMatchObject({ how: 'existing', state: 'plain' });
    expect(await prepareBacking(path, { name: 'x', force: true })).toMatchObject({ how: 'existing' });
    expect(await digest(path)).toBe(before);
  });

  test('mkswap over a cldd store: the swap signature wins, and only --force formats it', async () => {
    const path = await cldStore('swapped.img', { enable: true });
    await run('mkswap', [path], { env: { ...process.env, ...SBIN } });
    // mkswap leaves copy 1 of the cldd superblock: cldd still reads the store as valid.
    expect(await storeName(path)).toMatchObject({ name: 'old' });
    const before = await digest(path);
    await expect(prepareBacking(path, { name: 'new', force: false })).rejects.toMatchObject({
      code: 'CLDD_FOREIGN',
      message: `${path} is a cldd store with a swap signature at byte 4086, in the superblocks: another program wrote over it; cldd add --force formats it anew, destroying its contents`,
    });
    expect(await digest(path)).toBe(before);

    expect(await prepareBacking(path, { name: 'new', force: true })).toMatchObject({ how: 'formatted', state: 'plain' });
    expect(await storeName(path)).toMatchObject({ name: 'new' });
    expect(await listSignatures(path)).toEqual([]);
  });

  test('a filesystem made over the whole file is refused as before', async () => {
    const path = await cldStore('ext4.img');
    await run('mkfs.ext4', ['-q', '-F', path], { env: { ...process.env, ...SBIN } });
    const before = await digest(path);
    await expect(prepareBacking(path, { name: 'x', force: false })).rejects.toMatchObject({ code: 'CLDD_FOREIGN' });
    expect(await digest(path)).toBe(before);
  });

  test('a store with blocks larger than the page size is refused before anything is written', async () => {
    const path = await cldStore('big-blocks.img', { blockSize: 8192 });
    const before = await digest(path);
    await expect(prepareBacking(path, { name: 'x', force: false })).rejects.toMatchObject({
      code: 'EINVAL',
      message: `${path} is a cldd store with 8192-byte blocks, which cannot be attached: a block device's blocks are at most the page size (4096 bytes on x86-64); cldd add --force formats it anew, destroying its contents`,
    });
    expect(await digest(path)).toBe(before);
  });

  test('a format over an older store leaves none of its superblock copies to come back', async () => {
    // 64 KiB blocks: the old copy 1 lies at 65536, beyond what a 4 KiB format writes.
    const path = await cldStore('reformat.img', { blockSize: 65536, size: 64 * MiB, enable: true });
    expect(await prepareBacking(path, { name: 'new', force: true })).toMatchObject({ how: 'formatted' });
    expect(await storeName(path)).toEqual({ name: 'new', blockSize: 4096 });
    // Both new copies damaged: the store is damaged, and must not read as the old one.
    const fh = await open(path, 'r+');
    for (const at of [100, 4096 + 100]) await fh.write(new Uint8Array([0xff]), 0, 1, at);
    await fh.close();
    await expect(storeName(path)).rejects.toMatchObject({ code: 'CLDD_CORRUPT' });
  });

  test('a new file the file system cannot make that long is removed again', async () => {
    // A child whose files may hold 1 MiB asks for 64 MiB: the truncate fails with EFBIG, as it
    // does on ext4 past 16 TiB. It used to leave an empty file, which the next try refused.
    const path = join(dir, 'big.img');
    const script = `
      import { prepareBacking } from ${dist('cli', 'backing.js')};
      prepareBacking(process.argv[1], { name: 'x', force: false, size: ${64 * MiB} }).then(
        () => console.log('created'),
        (err) => console.log(err.code, err.message),
      );`;
    expect(await underFileLimit(MiB, script, path)).toMatch(new RegExp(`^EFBIG cannot make ${path} 67108864 bytes long: `));
    expect(existsSync(path)).toBe(false);
  });

  test('a new file that is too small is never created', async () => {
    const path = join(dir, 'small.img');
    await expect(prepareBacking(path, { name: 'x', force: false, size: MiB })).rejects.toMatchObject({ code: 'CLDD_TOO_SMALL' });
    expect(existsSync(path)).toBe(false);
  });
});

