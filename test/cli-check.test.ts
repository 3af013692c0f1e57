import { execFile } from 'node:child_process';
import { mkdtemp, open, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { Disk } from '../src/engine/executor.js';
import { Volume } from '../src/engine/volume.js';
import { FileStore } from '../src/store/file-store.js';

const run = promisify(execFile);
const CLI = join(__dirname, '..', 'bin', 'cldd.js');

async function cldd(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await run(process.execPath, [CLI, ...args]);
    return { code: 0, stdout, stderr };
  } catch (err) {
    const e = err as { code: number; stdout: string; stderr: string };
    return { code: e.code, stdout: e.stdout, stderr: e.stderr };
  }
}

describe('cldd check', () => {
  let dir: string;
  let path: string;

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'cldd-cli-'));
    path = join(dir, 'store.img');
    const fh = await open(path, 'w');
    await fh.truncate(16 << 20);
    await fh.close();
    const store = await FileStore.open(path);
    const volume = await Volume.format(store, { name: 'cli' });
    await volume.enable();
    await new Disk(volume).write(0, new Uint8Array(8192).fill(7));
    await volume.close();
    await store.close();
  });

  afterAll(async () => {
    await rm(dir, { recursive: true, force: true });
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

  test('usage errors exit 2 with one line', async () => {
    const r = await cldd('frobnicate');
    expect(r.code).toBe(2);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
  });
});
