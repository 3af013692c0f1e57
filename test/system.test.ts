/**
 * Tier 2: the daemon's small system calls that need no device (src/system/system.ts).
 */
import { execFile } from 'node:child_process';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { expect, test } from 'vitest';
import { addon } from '../src/native/addon.js';

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
