/**
 * cldd enable against a stand-in daemon (a ControlServer in this process): what the command
 * line asks the daemon for.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, expect, test } from 'vitest';
import { ControlServer } from '../src/daemon/control-server.js';
import { type Cli, buildCli } from './support/cli.js';

let cli: Cli;
let dir: string;
let server: ControlServer;
const asked: Record<string, unknown>[] = [];

beforeAll(async () => {
  cli = await buildCli();
  dir = await mkdtemp(join(tmpdir(), 'cldd-enable-'));
  server = new ControlServer(join(dir, 'p.sock'), 'p', {
    enable: async (params) => {
      asked.push(params);
      return { epoch: 3, frozen: null, frozenMs: null };
    },
    // enable --wait asks first whether a resync runs (it follows one before enabling).
    progress: async () => ({ state: 'plain', running: false, blocksLeft: 0, blocksMerged: 0, rate: 0, secondsLeft: 0, error: null }),
  });
  await server.listen();
});

afterAll(async () => {
  await server.close();
  await rm(dir, { recursive: true, force: true });
  await cli.remove();
});

test.skipIf(process.getuid?.() !== 0)('--no-freeze asks for no freeze; --freeze names the mountpoint; neither freezes wherever the master is mounted', async () => {
  const env = { CLDD_RUN_DIR: dir };
  for (const [args, want] of [
    [['--no-freeze'], { freeze: '', noFreeze: true, wait: false }],
    [['--freeze', '/srv'], { freeze: '/srv', noFreeze: false, wait: false }],
    [['--wait'], { freeze: '', noFreeze: false, wait: true }],
  ] as const) {
    asked.length = 0;
    const r = await cli.run(['enable', 'p', ...args], { env });
    expect(r.stderr, args.join(' ')).toBe('');
    expect(r.stdout).toBe('snapshot 3 taken\n');
    expect(asked).toEqual([want]);
  }
});
