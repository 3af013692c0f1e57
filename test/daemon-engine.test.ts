/**
 * The daemon's logic and the CLI against it, on any machine: a daemon with a file store and no
 * kernel devices (the engine-only backend), driven by the real cldd command over the socket.
 */
import { execFile, spawnSync } from 'node:child_process';
import { mkdtemp, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { Daemon } from '../src/daemon/daemon.js';
import { CldError } from '../src/errors.js';
import { engineOnlyBackend } from './support/engine-backend.js';
import { DaemonClient } from '../src/protocol/client.js';
import { DEFAULT_CONFIG } from '../src/protocol/config.js';
import { PROGRESS_WAIT_MAX_MS } from '../src/protocol/methods.js';
import { socketPath } from '../src/protocol/paths.js';
import type { Freezer } from '../src/system/freeze.js';
import type { Logger } from '../src/daemon/logger.js';
import { Disk, formattedFile } from './support/disk.js';
import { removeState, writeState } from '../src/protocol/state-file.js';

const run = promisify(execFile);
const CLI = join(__dirname, '..', 'bin', 'cldd.js');
const quiet: Logger = { error: () => {}, warn: () => {}, info: () => {}, debug: () => {} };
const noFreezer: Freezer = {
  freeze: async () => {
    throw new Error('nothing should be frozen without devices');
  },
  thaw: async () => {},
};

describe('daemon without devices', () => {
  let dir: string;
  let backing: string;
  let env: NodeJS.ProcessEnv;
  let daemon: Daemon;
  const paths = () => ({ runDir: join(dir, 'run'), configDir: join(dir, 'etc') });

  async function cldd(...args: string[]) {
    try {
      const r = await run(process.execPath, [CLI, ...args], { env });
      return { code: 0, ...r };
    } catch (err) {
      const e = err as { code: number; stdout: string; stderr: string };
      return { code: e.code, stdout: e.stdout, stderr: e.stderr };
    }
  }

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'cldd-daemon-'));
    backing = join(dir, 'disk.img');
    await formattedFile(backing, 32 << 20, { name: 'work' }, (volume) => new Disk(volume).write(0, new Uint8Array(1 << 20).fill(1)));
    env = { ...process.env, CLDD_RUN_DIR: paths().runDir, CLDD_CONFIG_DIR: paths().configDir };
    daemon = await Daemon.start({ ...DEFAULT_CONFIG, name: 'work', backing }, engineOnlyBackend(noFreezer), quiet, paths());
  });

  afterAll(async () => {
    await daemon?.stop();
    await rm(dir, { recursive: true, force: true });
  });

  test('status and list', async () => {
    const s = await cldd('status', 'work', '--json');
    expect(s.code).toBe(0);
    expect(JSON.parse(s.stdout)).toMatchObject({ name: 'work', state: 'plain', backing, pid: process.pid, redirected: 0 });
    const l = await cldd('list');
    expect(l.stdout).toMatch(/^NAME\s+STATE/);
    expect(l.stdout).toMatch(/\nwork\s+plain/);
  });

  test('enable, refusals, disable --wait', async () => {
    expect((await cldd('disable', 'work')).stderr).toBe('cldd: the slave is not enabled (the state is plain) [CLDD_STATE]\n');
    const e = await cldd('enable', 'work', '--json');
    expect(e.code).toBe(0);
    expect(JSON.parse(e.stdout)).toEqual({ epoch: 1, frozen: null, frozenMs: null });
    const again = await cldd('enable', 'work');
    expect(again.code).toBe(1);
    expect(again.stderr).toBe('cldd: the slave is already enabled (snapshot 1) [CLDD_STATE]\n');

    // Write through the daemon's engine as the master would, then resync.
    const status = JSON.parse((await cldd('status', 'work', '--json')).stdout);
    expect(status.state).toBe('snapshot');
    const d = await cldd('disable', 'work', '--wait');
    expect(d.code).toBe(0);
    expect(d.stdout).toMatch(/work: slave disabled; 0 blocks to merge back/);
    expect(JSON.parse((await cldd('status', 'work', '--json')).stdout).state).toBe('plain');
  });

  test('changes between snapshots, and status says what changed since the last one', async () => {
    // Runs after the test above: the pair is plain, in snapshot 1's period, with no writes since.
    const plain = await cldd('changes', 'work');
    expect(plain.code).toBe(1);
    expect(plain.stderr).toMatch(/no snapshot is enabled \(the state is plain\).*\[CLDD_STATE\]\n$/);
    const before = JSON.parse((await cldd('status', 'work', '--json')).stdout);
    // The 1 MiB written before snapshot 1 is its delta 0 -> 1.
    expect(before.tracking).toEqual({ chunkSize: 65536, since: 1, changedBytes: 0, deltaBytes: 1 << 20 });
    expect((await cldd('status', 'work')).stdout).toMatch(/changed {5}0 B since snapshot 1; snapshot 0 -> 1: 1\.0 MiB/);
    expect((await cldd('enable', 'work')).code).toBe(0);
    const c = await cldd('changes', 'work', '--json');
    expect(c.code).toBe(0);
    expect(JSON.parse(c.stdout)).toMatchObject({ snapshot: 2, since: 1, available: true, reason: null, changedBytes: 0, extents: [] });
    // Only the last delta is kept: an older snapshot is "everything changed", said so.
    const old = await cldd('changes', 'work', '--since', '0');
    expect(old.code).toBe(0);
    expect(old.stdout).toMatch(/^work: snapshot 0 -> 2: not tracked \(only the changes since snapshot 1 are kept\): everything changed, 15\.0 MiB\nOFFSET +LENGTH\n0 +15728640\n$/);
    expect((await cldd('changes', 'work', '--since', '3')).stderr).toMatch(/snapshot 3 is after the enabled snapshot 2 \[EINVAL\]/);
    expect((await cldd('changes', 'work', '--since', '-1')).code).toBe(2);
    // Without devices there is no slave to copy from: refused before anything changes.
    const b = await cldd('backup', 'work', join(dir, 'backup.img'));
    expect(b.stderr).toMatch(/has no devices.*\[ENODEV\]/);
    await expect(stat(join(dir, 'backup.img.cldd-backup'))).rejects.toMatchObject({ code: 'ENOENT' });
    expect((await cldd('disable', 'work', '--wait')).code).toBe(0);
  });

  test('a second daemon for the same name or the same backing is refused', async () => {
    await expect(Daemon.start({ ...DEFAULT_CONFIG, name: 'work', backing }, engineOnlyBackend(noFreezer), quiet, paths())).rejects.toMatchObject({
      code: 'EBUSY',
      message: `pair "work" is already running (pid ${process.pid})`,
    });
    await expect(Daemon.start({ ...DEFAULT_CONFIG, name: 'other', backing }, engineOnlyBackend(noFreezer), quiet, paths())).rejects.toMatchObject({
      code: 'EBUSY',
      message: `${backing} is already attached as pair "work" (pid ${process.pid})`,
    });
  });

  test('unknown pairs and devices give one clear line', async () => {
    const r = await cldd('status', 'nosuch');
    expect(r.code).toBe(1);
    expect(r.stderr).toBe('cldd: no pair named "nosuch" is running [ENOENT]\n');
    const bad = await cldd('enable', 'Bad/Name');
    expect(bad.stderr).toMatch(/not a valid pair name/);
  });

  test('a pair whose daemon died says how to reattach it', async () => {
    // What a SIGKILLed daemon leaves: its state file, no one on the socket.
    const dead = spawnSync(process.execPath, ['-e', '']).pid!;
    await writeState(paths(), { name: 'gone', pid: dead, backing: '/srv/gone.img', backingId: '1:2', master: { id: 7, path: '/dev/ublkb7' }, slave: null, index: 3, startedAt: 0 });
    try {
      for (const cmd of ['status', 'disable', 'remove']) {
        const r = await cldd(cmd, 'gone');
        expect(r.code).toBe(1);
        expect(r.stderr).toBe(`cldd: the daemon of "gone" (pid ${dead}) died and its devices wait for it: run "cldd add /srv/gone.img" to reattach them, then retry [ESRCH]\n`);
      }
    } finally {
      await removeState(paths(), 'gone');
    }
  });

  test("the daemon's methods refuse params of the wrong type or range with EINVAL, and answer a result otherwise", async () => {
    const client = await DaemonClient.connect(socketPath(paths(), 'work'), 'work');
    try {
      for (const bytesPerSecond of ['abc', -5, 1e-300, 1.5, null]) {
        await expect(client.call('resync-rate', { bytesPerSecond }), String(bytesPerSecond)).rejects.toMatchObject({ code: 'EINVAL' });
      }
      await expect(client.call('enable', { wait: 'no' })).rejects.toMatchObject({ code: 'EINVAL', message: 'enable: params.wait must be true or false' });
      await expect(client.call('stop', { force: 'yes' })).rejects.toMatchObject({ code: 'EINVAL' });
      expect(await client.call('resync-rate', { bytesPerSecond: 1 << 20 })).toEqual({ bytesPerSecond: 1 << 20 });
      expect(await client.call('resync-rate', { bytesPerSecond: 0 })).toEqual({ bytesPerSecond: 0 });
      expect(await client.request('progress', { waitMs: undefined })).toMatchObject({ state: 'plain' });
      // No resync runs: a wait asked for ends at once.
      expect(await client.request('progress', { waitMs: PROGRESS_WAIT_MAX_MS })).toMatchObject({ state: 'plain', running: false });
      await expect(client.call('progress', { waitMs: PROGRESS_WAIT_MAX_MS + 1 })).rejects.toMatchObject({ code: 'EINVAL', message: expect.stringMatching(/^progress: params\.waitMs must be/) });
      await expect(client.call('progress', { waitMs: -1 })).rejects.toMatchObject({ code: 'EINVAL' });
    } finally {
      client.close();
    }
  });
});

describe('a daemon whose start fails', () => {
  test('undoes what it started, last first, and keeps the error of the step that failed', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'cldd-daemon-undo-'));
    try {
      const backing = join(dir, 'disk.img');
      await formattedFile(backing, 16 << 20, { name: 'undo' });
      const done: string[] = [];
      const inner = engineOnlyBackend(noFreezer);
      const backend = {
        ...inner,
        async open(path: string) {
          const opened = await inner.open(path);
          const close = opened.store.close.bind(opened.store);
          opened.store.close = async () => {
            done.push('store closed');
            await close();
          };
          return opened;
        },
        // The devices fail to start, after the store is open and the volume recovered.
        startDevices: async () => {
          done.push('devices refused');
          throw new CldError('ENODEV', "the kernel's ublk driver is not loaded");
        },
      };
      const paths = { runDir: join(dir, 'run'), configDir: join(dir, 'etc') };
      await expect(Daemon.start({ ...DEFAULT_CONFIG, name: 'undo', backing }, backend, quiet, paths)).rejects.toMatchObject({
        code: 'ENODEV',
        message: "the kernel's ublk driver is not loaded",
      });
      expect(done).toEqual(['devices refused', 'store closed']);
      // Nothing is left that holds the pair: a daemon without devices starts on the same store.
      const daemon = await Daemon.start({ ...DEFAULT_CONFIG, name: 'undo', backing }, engineOnlyBackend(noFreezer), quiet, paths);
      expect(daemon.service.status().state).toBe('plain');
      await daemon.stop();
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
