import { execFile } from 'node:child_process';
import { copyFile, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { Disk, formattedFile } from './support/disk.js';
import { type Cli, buildCli } from './support/cli.js';

const run = promisify(execFile);
let cli: Cli;
const cldd = (...args: string[]) => cli.run(args);

describe('cldd check', () => {
  let dir: string;
  let path: string;

  beforeAll(async () => {
    cli = await buildCli();
    dir = await mkdtemp(join(tmpdir(), 'cldd-cli-'));
    path = join(dir, 'store.img');
    await formattedFile(path, 16 << 20, { name: 'cli' }, async (volume) => {
      await volume.enable();
      await new Disk(volume).write(0, new Uint8Array(8192).fill(7));
    });
  });

  afterAll(async () => {
    await rm(dir, { recursive: true, force: true });
    await cli.remove();
  });

  test('a clean store: exit 0 and a summary', async () => {
    const r = await cldd('check', path);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/name "cli"/);
    expect(r.stdout).toMatch(/state snapshot/);
    expect(r.stdout).toMatch(/2 blocks redirected/);
    expect(r.stdout.trim().endsWith('clean')).toBe(true);
  });

  test('--json', async () => {
    const r = await cldd('check', '--json', path);
    expect(r.code).toBe(0);
    expect(JSON.parse(r.stdout)).toMatchObject({ clean: true, state: 'snapshot', redirected: 2, findings: [] });
  });

  test('a damaged store: exit 1 and the finding; check writes nothing', async () => {
    const damaged = join(dir, 'damaged.img');
    const bytes = await readFile(path);
    // Break both superblock copies' checksums.
    bytes[100] ^= 0xff;
    bytes[4096 + 100] ^= 0xff;
    await writeFile(damaged, bytes);
    const r = await cldd('check', damaged);
    expect(r.code).toBe(1);
    expect(r.stdout).toMatch(/error: .*both superblock copies are damaged/);
    expect(r.stdout.trim().endsWith('damaged')).toBe(true);
    expect(Buffer.compare(await readFile(damaged), bytes)).toBe(0);
  });

  test('not a store, or missing: one line on stderr, exit 2', async () => {
    const foreign = join(dir, 'foreign.img');
    await writeFile(foreign, Buffer.alloc(1 << 20, 0x41));
    let r = await cldd('check', foreign);
    expect(r.code).toBe(2);
    expect(r.stderr).toBe(`cldd: ${foreign} is not a cldd store (no cldd signature) [CLDD_FOREIGN]\n`);
    r = await cldd('check', join(dir, 'missing.img'));
    expect(r.code).toBe(2);
    expect(r.stderr).toBe(`cldd: ${join(dir, 'missing.img')} does not exist [ENOENT]\n`);
  });

  test('mkswap over a store: the swap signature is damage, exit 1, and check writes nothing', async () => {
    const swapped = join(dir, 'swapped.img');
    await copyFile(path, swapped);
    await run('mkswap', [swapped], { env: { ...process.env, PATH: `${process.env.PATH}:/usr/sbin:/sbin` } });
    const bytes = await readFile(swapped);
    const r = await cldd('check', swapped);
    expect(r.code).toBe(1);
    expect(r.stdout).toMatch(/^error: a swap signature at byte 4086, in the superblocks: another program wrote over this store$/m);
    expect(r.stdout.trim().endsWith('damaged')).toBe(true);
    const json = await cldd('check', '--json', swapped);
    expect(json.code).toBe(1);
    expect(JSON.parse(json.stdout)).toMatchObject({
      clean: false,
      findings: expect.arrayContaining([{ severity: 'error', message: expect.stringContaining('a swap signature at byte 4086') }]),
    });
    expect(Buffer.compare(await readFile(swapped), bytes)).toBe(0);
  });

  test('a crafted store name cannot forge output lines or send escape sequences', async () => {
    const crafted = join(dir, 'crafted.img');
    await formattedFile(crafted, 16 << 20, { name: 'x"\nclean\x1b[2J\x9b1m' });
    const r = await cldd('check', crafted);
    expect(r.code).toBe(0);
    expect(r.stdout).not.toMatch(/[\x00-\x09\x0b-\x1f\x7f-\x9f]/);
    const lines = r.stdout.trimEnd().split('\n');
    expect(lines).toHaveLength(4);
    expect(lines[0]).toContain('name "x"\\nclean\\x1b[2J\\x9b1m"');
    expect(lines[2]).toBe('changed since snapshot 0: 0 bytes');
    expect(lines[3]).toBe('clean');
  });

  test('a path with a newline is escaped in the one line of an error', async () => {
    const r = await cldd('check', join(dir, 'no\nsuch.img'));
    expect(r.code).toBe(2);
    expect(r.stderr).toBe(`cldd: ${join(dir, 'no\\nsuch.img')} does not exist [ENOENT]\n`);
  });

  test('usage errors exit 2 with one line', async () => {
    const r = await cldd('frobnicate');
    expect(r.code).toBe(2);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
  });
});
