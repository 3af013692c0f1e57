import { execFile } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { expect, test } from 'vitest';
import { formatConfig, parseConfig } from '../src/protocol/config.js';
import { renderUnit } from '../src/cli/systemd-unit.js';

const run = promisify(execFile);

test.each([
  ['this checkout', undefined],
  // A checkout may be anywhere: a space split ExecStart's script path in two, and a % in it is a
  // systemd specifier.
  ['a checkout whose path holds a space and a %', '/root/my disks/cldd 100%'],
])('cldd@.service for %s passes systemd-analyze verify without a warning', async (_what, home) => {
  const dir = await mkdtemp(join(tmpdir(), 'cldd-unit-'));
  try {
    const unit = await renderUnit(process.execPath, home);
    if (home) {
      expect(unit).toContain(`\nExecStart="${process.execPath}" "--max-semi-space-size=1" "/root/my disks/cldd 100%%/bin/cldd.js" daemon %i\n`);
      expect(unit).toContain('\nDocumentation=file:///root/my%%20disks/cldd%%20100%%25/README.md\n');
    }
    expect(unit).not.toMatch(/@[A-Z_]+@/);
    expect(unit).toMatch(/^Type=notify$/m);
    expect(unit).toMatch(/^ExecStartPre=\/sbin\/modprobe ublk_drv$/m);
    await writeFile(join(dir, 'cldd@.service'), unit);
    const { stdout, stderr } = await run('systemd-analyze', ['verify', join(dir, 'cldd@demo.service')]);
    // verify exits 0 even for settings it ignores; any output is a finding.
    expect(stdout + stderr).toBe('');
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('pair configuration round trip and refusals', () => {
  const config = { backing: '/srv/disk.img', queues: 2, depth: 64, logLevel: 'debug' as const, resyncRate: 1 << 20, zeroCopy: false, pollMicros: 0 };
  expect(parseConfig(formatConfig(config), 'x.conf')).toEqual(config);
  expect(parseConfig('BACKING="/dev/sdb1"\n# comment\n', 'x.conf')).toMatchObject({ backing: '/dev/sdb1', queues: 1, depth: 128, zeroCopy: true });
  expect(() => parseConfig('QUEUES=1\n', 'x.conf')).toThrow('x.conf: BACKING must be an absolute path');
  expect(() => parseConfig('BACKING=rel/path\n', 'x.conf')).toThrow(/absolute/);
  expect(() => parseConfig('BACKING=/a\nDEPTH=0\n', 'x.conf')).toThrow('x.conf: DEPTH=0 is not a whole number from 1 to 4096');
  for (const bad of ['0x10', '1e2', '8.0', '+8', '']) {
    expect(() => parseConfig(`BACKING=/a\nQUEUES=${bad}\n`, 'x.conf')).toThrow(`x.conf: QUEUES=${bad} is not a whole number`);
  }
  expect(() => parseConfig('BACKING=/a\nCOLOUR=red\n', 'x.conf')).toThrow('x.conf:2: unknown key COLOUR');
  expect(() => parseConfig('BACKING=/a\njunk\n', 'x.conf')).toThrow('x.conf:2: expected KEY=value');
  expect(() => parseConfig('BACKING=/a\nLOG_LEVEL=loud\n', 'x.conf')).toThrow(/LOG_LEVEL/);
  expect(() => parseConfig('BACKING=/a\nZERO_COPY=maybe\n', 'x.conf')).toThrow('x.conf: ZERO_COPY must be yes or no');
  expect(parseConfig('BACKING=/a\n', 'x.conf').pollMicros).toBe(100);
  expect(parseConfig('BACKING=/a\nPOLL_US=0\n', 'x.conf').pollMicros).toBe(0);
  expect(() => parseConfig('BACKING=/a\nPOLL_US=10001\n', 'x.conf')).toThrow('x.conf: POLL_US=10001 is not a whole number from 0 to 10000');
});
