/**
 * cldd status and list against a stand-in daemon (a ControlServer in this process), through the
 * command line as a user runs it: who may ask, and what reaches the terminal.
 */
import { chmod, mkdir, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { ControlServer } from '../src/daemon/control-server.js';
import { type Cli, buildCli } from './helpers/cli.js';

/** What a daemon could answer about a store whose name and paths were crafted. */
const CRAFTED = {
  name: 'evil\nevil: plain\x1b[2J',
  backing: '/srv/x.img\n  master      /dev/sda\x1b]0;owned\x07',
  pid: 4242,
  state: 'plain',
  master: '/dev/ublkb0\r',
  slave: null,
  capacity: 1 << 30,
  blockSize: 4096,
  redirected: 0,
  snapshot: 0,
  resync: null,
  counters: { reads: 0, writes: 0, flushes: 0, discards: 0, bytesRead: 0, bytesWritten: 0, errors: 0 },
  failed: 'boom\x9b31m\u202e',
};

const RAW_CONTROL = /[\x00-\x09\x0b-\x1f\x7f-\x9f\u202e]/;

describe('cldd status and list', () => {
  let cli: Cli;
  let dir: string;
  let runDir: string;
  let server: ControlServer;
  let stuck: ControlServer;

  beforeAll(async () => {
    cli = await buildCli();
    dir = await mkdtemp(join(tmpdir(), 'cldd-status-'));
    await chmod(dir, 0o755);
    runDir = join(dir, 'run');
    server = new ControlServer(join(runDir, 'evil.sock'), 'evil', { status: async () => CRAFTED });
    await server.listen();
    stuck = new ControlServer(join(runDir, 'stuck.sock'), 'stuck', {
      status: async () => ({ ...CRAFTED, name: 'stuck', backing: '/srv/s.img', failed: null, requests: { outstanding: 32, oldestMs: 45_300 } }),
    });
    await stuck.listen();
  });

  afterAll(async () => {
    await server.close();
    await stuck.close();
    await rm(dir, { recursive: true, force: true });
    await cli.remove();
  });

  const env = () => ({ CLDD_RUN_DIR: runDir });

  test('as a user who cannot read the run directory, list and status say permission denied', async () => {
    await chmod(runDir, 0o700);
    for (const args of [['list'], ['list', '--json'], ['status'], ['status', '--json']]) {
      const r = await cli.run(args, { env: env(), unprivileged: true });
      expect(r.stderr).toBe(`cldd: permission denied on ${runDir} (are you root?) [EACCES]\n`);
      expect(r.code).not.toBe(0);
      expect(r.stdout).toBe('');
    }
  });

  test('as a user who can list the sockets but not connect, list says permission denied too', async () => {
    await chmod(runDir, 0o755);
    try {
      const r = await cli.run(['list'], { env: env(), unprivileged: true });
      expect(r.stderr).toBe(`cldd: permission denied on ${join(runDir, 'evil.sock')} (are you root?) [EACCES]\n`);
      expect(r.code).not.toBe(0);
    } finally {
      await chmod(runDir, 0o700);
    }
  });

  test('no run directory at all: no pairs are running', async () => {
    const r = await cli.run(['list'], { env: { CLDD_RUN_DIR: join(dir, 'none') }, unprivileged: true });
    expect(r).toMatchObject({ code: 0, stdout: 'no cldd pairs are running\n', stderr: '' });
  });

  test('a crafted name, path or message cannot forge lines or send escape sequences', async () => {
    const one = await cli.run(['status', 'evil'], { env: env() });
    expect(one.code).toBe(0);
    const all = await cli.run(['status'], { env: env() });
    expect(all.code).toBe(0);
    for (const out of [one.stdout, all.stdout.split('\n\n').find((p) => p.startsWith('evil'))!]) {
      expect(out).not.toMatch(RAW_CONTROL);
      const lines = out.trimEnd().split('\n');
      expect(lines).toHaveLength(7);
      expect(lines[0]).toBe('evil\\nevil: plain\\x1b[2J: plain (FAILED: boom\\x9b31m\\u202e)');
      expect(lines[1]).toBe('  backing     /srv/x.img\\n  master      /dev/sda\\x1b]0;owned\\x07');
      expect(lines[2]).toMatch(/^ {2}master {6}\/dev\/ublkb0\\r {2}\(/);
    }
    const list = await cli.run(['list'], { env: env() });
    expect(list.code).toBe(0);
    expect(list.stdout).not.toMatch(RAW_CONTROL);
    expect(list.stdout.trimEnd().split('\n')).toHaveLength(3);
    expect(list.stdout).toContain('evil\\nevil: plain\\x1b[2J');
  });

  test('requests outstanding far too long show in status, with where to look', async () => {
    const out = await cli.run(['status', 'stuck'], { env: env() });
    expect(out.code).toBe(0);
    expect(out.stdout).toContain("  requests    32 outstanding, the oldest for 45 s (the daemon's log says where they wait)\n");
    const healthy = await cli.run(['status', 'evil'], { env: env() });
    expect(healthy.stdout).not.toContain('requests');
  });

  test('--json keeps the values, JSON-escaped, with C1 and bidirectional controls as \\u escapes', async () => {
    for (const args of [['status', 'evil', '--json'], ['list', '--json']]) {
      const r = await cli.run(args, { env: env() });
      expect(r.code).toBe(0);
      expect(r.stdout).not.toMatch(RAW_CONTROL);
      expect(r.stdout).toContain('boom\\u009b31m\\u202e');
      const parsed = JSON.parse(r.stdout);
      expect(Array.isArray(parsed) ? parsed[0] : parsed).toEqual(CRAFTED);
    }
  });
});
