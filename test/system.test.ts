/**
 * Tier 2: the daemon's small system calls that need no device (src/system/system.ts,
 * src/system/device-users.ts), and the bounded runs of other programs (src/deadline.ts).
 */
import { execFile, spawn } from 'node:child_process';
import { mkdtemp, open, readFile, readlink, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { expect, test } from 'vitest';
import { runWithin } from '../src/deadline.js';
import { addon } from '../src/native/addon.js';
import { usersOf } from '../src/system/device-users.js';
import { writesZeroes } from '../src/system/system.js';

const run = promisify(execFile);
const ADDON = join(import.meta.dirname, '..', 'build', 'Release', 'cldd_native.node');

test('disableHugePages turns transparent huge pages off for the process and for the children it starts', async () => {
  // In a process of its own: the flag cannot be turned back on from here, and a test runner's
  // worker should keep the memory behaviour it had.
  const script = `
    const { execFileSync } = require('node:child_process');
    const thp = (status) => /^THP_enabled:\\s*(\\d)/m.exec(status)?.[1];
    const own = () => thp(require('node:fs').readFileSync('/proc/self/status', 'utf8'));
    const before = own();
    require(process.argv[1]).disableHugePages();
    const child = thp(execFileSync('cat', ['/proc/self/status'], { encoding: 'utf8' }));
    console.log(JSON.stringify({ before, after: own(), child }));
  `;
  const { stdout } = await run(process.execPath, ['-e', script, ADDON]);
  expect(JSON.parse(stdout)).toEqual({ before: '1', after: '0', child: '0' });
});

test('fixMmapThreshold takes a whole number of bytes up to 32 MiB and refuses anything else', () => {
  // In this process: 128 KiB is glibc's default threshold, so setting it changes nothing but
  // stopping the threshold from moving.
  const { fixMmapThreshold } = addon();
  for (const bad of [-1, 1.5, Number.NaN, (32 << 20) + 1, '4096' as unknown as number]) {
    expect(() => fixMmapThreshold(bad)).toThrow(expect.objectContaining({ code: 'EINVAL' }));
  }
  expect(fixMmapThreshold(128 * 1024)).toBeUndefined();
});

test('usersOf finds the processes holding a path open, not this one, and forgets them once they let go', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'cldd users '));
  const held = join(dir, 'held dev');
  const free = join(dir, 'free');
  await writeFile(held, 'x');
  await writeFile(free, 'x');
  const own = await open(held, 'r'); // this process's own fds are never listed
  const child = spawn('sh', ['-c', 'exec 3<"$0"; exec sleep 60', held], { stdio: 'ignore' });
  try {
    // Created, not hoped for: wait (bounded) until the child's fd 3 is the file.
    const deadline = Date.now() + 10_000;
    for (;;) {
      const target = await readlink(`/proc/${child.pid}/fd/3`).catch(() => null);
      if (target === held && (await readFile(`/proc/${child.pid}/comm`, 'utf8')).trim() === 'sleep') break;
      if (Date.now() > deadline) throw new Error(`the child (pid ${child.pid}) did not open ${held} within 10 s`);
      await new Promise((r) => setTimeout(r, 10));
    }
    expect(await usersOf(held)).toEqual({ mounts: [], openers: [{ pid: child.pid, command: 'sleep' }] });
    expect(await usersOf(free)).toEqual({ mounts: [], openers: [] });
    const exited = new Promise((r) => child.once('exit', r));
    child.kill('SIGKILL');
    await exited;
    expect((await usersOf(held)).openers).toEqual([]);
  } finally {
    child.kill('SIGKILL');
    await own.close();
    await rm(dir, { recursive: true, force: true });
  }
});

test('openersOf refuses anything but a path', async () => {
  const { openersOf } = addon();
  for (const bad of ['', 'x'.repeat(5000), 42 as unknown as string]) {
    expect(() => openersOf(bad)).toThrow(expect.objectContaining({ code: 'EINVAL' }));
  }
});

test('writesZeroes reads the queue of the device, or of the disk a partition is on', async () => {
  // A sysfs tree of its own: /sys/dev/block/MAJ:MIN links to the device's directory, a
  // partition's directory (holding "partition") sits in its disk's, which holds the queue.
  const sysfs = await mkdtemp(join(tmpdir(), 'cldd-sysfs-'));
  try {
    const { mkdir, symlink } = await import('node:fs/promises');
    await mkdir(join(sysfs, 'dev', 'block'), { recursive: true });
    for (const [disk, major, bytes] of [['sda', 8, '0'], ['nvme0n1', 259, '131072']] as const) {
      const dir = join(sysfs, 'devices', 'pci', 'block', disk);
      await mkdir(join(dir, 'queue'), { recursive: true });
      await writeFile(join(dir, 'queue', 'write_zeroes_max_bytes'), `${bytes}\n`);
      await mkdir(join(dir, `${disk}1`));
      await writeFile(join(dir, `${disk}1`, 'partition'), '1\n');
      await symlink(`../../devices/pci/block/${disk}`, join(sysfs, 'dev', 'block', `${major}:0`));
      await symlink(`../../devices/pci/block/${disk}/${disk}1`, join(sysfs, 'dev', 'block', `${major}:1`));
    }
    // dev_t as Node gives it: major in bits 8-19, minor in bits 0-7.
    const rdev = (major: number, minor: number) => major * 256 + minor;
    expect(await writesZeroes(rdev(8, 0), sysfs)).toBe(false);
    expect(await writesZeroes(rdev(8, 1), sysfs)).toBe(false);
    expect(await writesZeroes(rdev(259, 0), sysfs)).toBe(true);
    expect(await writesZeroes(rdev(259, 1), sysfs)).toBe(true);
    await expect(writesZeroes(rdev(7, 0), sysfs)).rejects.toMatchObject({ code: 'ENOENT' });
  } finally {
    await rm(sysfs, { recursive: true, force: true });
  }
});

test('runWithin gives a program\'s output, its last error line with a code, or says it did not finish and kills it', async () => {
  await expect(runWithin('sh', ['-c', 'echo out'], 10_000, 'sh echo')).resolves.toBe('out\n');
  await expect(runWithin('sh', ['-c', 'echo first >&2; echo last >&2; exit 3'], 10_000, 'sh fail')).rejects.toMatchObject({
    code: 'EIO',
    message: 'sh fail failed: last',
  });
  await expect(runWithin('/nonexistent/tool', [], 10_000, 'tool')).rejects.toMatchObject({ code: 'ENOENT' });
  // A program that would run for a minute: killed at the bound, and the error names it.
  const dir = await mkdtemp(join(tmpdir(), 'cldd-within-'));
  try {
    const pidFile = join(dir, 'pid');
    await expect(runWithin('sh', ['-c', `echo $$ > ${pidFile}; exec sleep 60`], 300, 'wipefs --json')).rejects.toMatchObject({
      code: 'ETIMEDOUT',
      message: 'wipefs --json did not finish within 0.3 s',
    });
    const pid = Number(await readFile(pidFile, 'utf8'));
    expect(() => process.kill(pid, 0)).toThrow();
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});
