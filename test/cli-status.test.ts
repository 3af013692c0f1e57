/**
 * cldd status and list against a stand-in daemon (a ControlServer in this process), through the
 * command line as a user runs it: who may ask, and what reaches the terminal.
 */
import { chmod, mkdir, mkdtemp, rm } from 'node:fs/promises';
import { createServer, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { ControlServer } from '../src/daemon/control-server.js';
import { type Cli, buildCli } from './support/cli.js';

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
      status: async () => ({ ...CRAFTED, name: 'stuck', backing: '/srv/s.img', failed: null, requests: { outstanding: 32, oldestMs: 45_300 },
        counters: { ...CRAFTED.counters, flushes: 15, commits: 12, queueCommits: 9, pollsCaught: 7001, pollsRanOut: 3 },
        journal: { bytes: 3 << 20, uncommittedBytes: 240, compactionError: '/run/cldd/stuck.journal.new: EISDIR: illegal operation on a directory, open' } }),
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

  test("the commits, and how many a flush's queue thread ran, show in status when the daemon counts them", async () => {
    const out = await cli.run(['status', 'stuck'], { env: env() });
    expect(out.code).toBe(0);
    expect(out.stdout).toContain("  commits     12, 9 of them built and run by a queue thread (for a flush or a FUA write)\n");
    expect((await cli.run(['status', 'evil'], { env: env() })).stdout).not.toContain('commits');
  });

  test("the queue threads' polls show in status when there were any", async () => {
    const out = await cli.run(['status', 'stuck'], { env: env() });
    expect(out.stdout).toContain('  polls       7001 caught a request before the queue thread slept, 3 ran out\n');
    expect((await cli.run(['status', 'evil'], { env: env() })).stdout).not.toContain('polls');
  });

  test('a map journal that can no longer be compacted shows in status, with what failed', async () => {
    const out = await cli.run(['status', 'stuck'], { env: env() });
    expect(out.code).toBe(0);
    expect(out.stdout).toContain(
      '  journal     3.0 MiB, growing: committed records cannot be dropped (/run/cldd/stuck.journal.new: EISDIR: illegal operation on a directory, open); the next enable or disable empties it\n',
    );
    expect((await cli.run(['status', 'evil'], { env: env() })).stdout).not.toContain('journal');
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

/**
 * A stand-in daemon that answers every request with `reply(method, id)`, a raw JSON line: what a
 * broken or foreign daemon could send.
 */
async function rawDaemon(path: string, reply: (method: string, id: number) => string): Promise<Server> {
  await mkdir(dirname(path), { recursive: true });
  const server = createServer((socket) => {
    socket.setEncoding('utf8');
    let text = '';
    socket.on('error', () => {});
    socket.on('data', (d: string) => {
      text += d;
      let nl;
      while ((nl = text.indexOf('\n')) >= 0) {
        const message = JSON.parse(text.slice(0, nl));
        text = text.slice(nl + 1);
        socket.write(`${'hello' in message ? JSON.stringify({ hello: 1, pid: 4242, name: 'x' }) : reply(message.method, message.id)}\n`);
      }
    });
  });
  await new Promise<void>((resolve) => server.listen(path, resolve));
  return server;
}

describe('a daemon reply the CLI cannot use is EPROTO, never success', () => {
  let cli: Cli;
  let dir: string;
  let runDir: string;
  const servers: Server[] = [];
  const GOOD = { ...CRAFTED, name: 'good', backing: '/srv/good.img', failed: null };
  /** Results that are not what each method answers. */
  const MALFORMED: Record<string, unknown> = {
    str: 'just a string',
    num: 5,
    nul: null,
    arr: [1],
    nocounters: { name: 'n', state: 'plain', capacity: 1, blockSize: 4096, redirected: 0 },
    nanrate: { ...GOOD, resync: { running: true, blocksLeft: 1, blocksMerged: 0, rate: 'fast', secondsLeft: null, error: null } },
  };

  beforeAll(async () => {
    cli = await buildCli();
    dir = await mkdtemp(join(tmpdir(), 'cldd-replies-'));
    runDir = join(dir, 'run');
    for (const [name, result] of Object.entries(MALFORMED)) {
      servers.push(await rawDaemon(join(runDir, `${name}.sock`), (_method, id) => JSON.stringify({ id, result })));
    }
    // A reply with neither result nor error, and one with an error that has no code.
    servers.push(await rawDaemon(join(runDir, 'bare.sock'), (_method, id) => JSON.stringify({ id })));
    servers.push(await rawDaemon(join(runDir, 'baderror.sock'), (_method, id) => JSON.stringify({ id, error: 'no' })));
  });

  afterAll(async () => {
    for (const s of servers) await new Promise((resolve) => s.close(resolve));
    await rm(dir, { recursive: true, force: true });
    await cli.remove();
  });

  const env = () => ({ CLDD_RUN_DIR: runDir });
  const names = [...Object.keys(MALFORMED), 'bare', 'baderror'];

  /** One line on stderr ending with [EPROTO], nothing on stdout, a non-zero exit. */
  const refused = (r: { code: number; stdout: string; stderr: string }, what: string) => {
    expect(r.stderr, what).toMatch(/^cldd: the daemon of "[a-zA-Z]+" [^\n]+ \[EPROTO\]\n$/);
    expect(r.stdout, what).toBe('');
    expect(r.code, what).toBe(1);
  };

  test('status of one pair', async () => {
    for (const name of names) {
      refused(await cli.run(['status', name], { env: env() }), name);
      refused(await cli.run(['status', name, '--json'], { env: env() }), name);
    }
    const r = await cli.run(['status', 'nocounters'], { env: env() });
    expect(r.stderr).toBe('cldd: the daemon of "nocounters" answered status with a malformed reply: result.backing must be a string [EPROTO]\n');
  });

  test('disable, enable, remove and disable --wait say the reply is malformed and exit non-zero', async () => {
    for (const name of names) {
      for (const args of [['disable', name], ['enable', name], ['remove', name]]) refused(await cli.run(args, { env: env() }), args.join(' '));
    }
    // A disable answered well whose progress is malformed.
    const progress = await rawDaemon(join(runDir, 'progress.sock'), (method, id) =>
      JSON.stringify({ id, result: method === 'disable' ? { state: 'resync', blocks: 3 } : { state: 'resync', blocksLeft: 'many' } }),
    );
    servers.push(progress);
    const r = await cli.run(['disable', 'progress', '--wait'], { env: env() });
    expect(r.stdout).toBe('progress: slave disabled; 3 blocks to merge back\n');
    expect(r.stderr).toMatch(/^cldd: the daemon of "progress" answered progress with a malformed reply: result\.running must be true or false \[EPROTO\]\n$/);
    expect(r.code).toBe(1);
  });

  test('list and status of all pairs show every pair, and fail when one answered malformed', async () => {
    const good = new ControlServer(join(runDir, 'good.sock'), 'good', { status: async () => GOOD });
    await good.listen();
    try {
      for (const args of [['list'], ['status'], ['list', '--json'], ['status', '--json']]) {
        const r = await cli.run(args, { env: env() });
        expect(r.code, args.join(' ')).toBe(1);
        expect(r.stderr, args.join(' ')).toMatch(/^cldd: the daemon of "[a-zA-Z]+" [^\n]+ \[EPROTO\]\n$/);
        expect(r.stdout).toContain('/srv/good.img');
        expect(r.stdout).not.toMatch(/undefined|NaN/);
      }
    } finally {
      await good.close();
    }
  });
});
