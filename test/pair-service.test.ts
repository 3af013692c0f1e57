/**
 * What a pair's daemon waits for on request, and that each wait ends: enable --wait behind a
 * resync that stopped, and a FIFREEZE that does not return.
 */
import { describe, expect, test } from 'vitest';
import { within } from '../src/deadline.js';
import { CldError } from '../src/errors.js';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { type DeviceInfo, FREEZE_LIMIT_MS, type LinkKeeper, type PairDevices, PairService, freezeWithin } from '../src/daemon/pair-service.js';
import type { Logger } from '../src/daemon/logger.js';
import type { Executor } from '../src/engine/plan.js';
import { ResyncScheduler } from '../src/engine/resync.js';
import { Volume } from '../src/engine/volume.js';
import { MemoryStore } from '../src/io/memory-store.js';
import type { Freezer } from '../src/system/freeze.js';
import { Disk, StoreExecutor } from './support/disk.js';

const BS = 4096;

function recordingLog(): Logger & { lines: string[] } {
  const lines: string[] = [];
  const add = (level: string) => (message: string) => void lines.push(`${level}: ${message}`);
  return { lines, error: add('error'), warn: add('warn'), info: add('info'), debug: add('debug') };
}

const noFreezer: Freezer = { freeze: async () => {}, thaw: async () => {} };

/** Fails with a message saying what it was waiting for, if `promise` has not settled in `ms`. */
const bounded = <T>(promise: Promise<T>, ms: number, what: string): Promise<T> => within(promise, ms, () => new Error(`${what}: still waiting after ${ms} ms`));

/** A volume in resync with `blocks` blocks to merge back. */
async function resyncing(blocks: number): Promise<Volume> {
  const volume = await Volume.format(new MemoryStore(8 << 20), { blockSize: BS, name: 'pair' });
  await volume.enable();
  await new Disk(volume).write(0, new Uint8Array(blocks * BS).fill(7));
  await volume.disable();
  expect(volume.state).toBe('resync');
  return volume;
}

describe('enable --wait behind a resync', () => {
  const failing: Executor = {
    run: async () => {
      throw new CldError('EIO', 'read of 16384 bytes at 4198400: the disk said no');
    },
  };

  test('a resync whose merge fails ends the wait with its error', async () => {
    const volume = await resyncing(4);
    const scheduler = new ResyncScheduler(volume, failing, { yieldMs: 0 });
    const service = new PairService('pair', 'memory', volume, scheduler, null, noFreezer, recordingLog());
    void scheduler.start();
    await expect(bounded(service.enable({ wait: true }), 5000, 'enable --wait')).rejects.toMatchObject({
      code: 'CLDD_STATE',
      message: 'the resync stopped with 4 blocks left (read of 16384 bytes at 4198400: the disk said no); the slave cannot be enabled before it has finished',
    });
    expect(volume.state).toBe('resync');
  });

  test('a resync that is not running is not waited for', async () => {
    const volume = await resyncing(2);
    const scheduler = new ResyncScheduler(volume, failing, { yieldMs: 0 });
    const service = new PairService('pair', 'memory', volume, scheduler, null, noFreezer, recordingLog());
    await expect(bounded(service.enable({ wait: true }), 5000, 'enable --wait')).rejects.toMatchObject({
      code: 'CLDD_STATE',
      message: 'the resync stopped with 2 blocks left; the slave cannot be enabled before it has finished',
    });
  });

  test('a resync that finishes lets the enable go on', async () => {
    const volume = await resyncing(3);
    const scheduler = new ResyncScheduler(volume, new StoreExecutor(volume.store), { yieldMs: 0 });
    const service = new PairService('pair', 'memory', volume, scheduler, null, noFreezer, recordingLog());
    void scheduler.start();
    await expect(bounded(service.enable({ wait: true }), 5000, 'enable --wait')).resolves.toMatchObject({ epoch: 2, frozen: null });
    expect(volume.state).toBe('snapshot');
  });
});

/** An executor whose merges wait until `open()`. */
function gated(store: MemoryStore): Executor & { open: () => void } {
  let open!: () => void;
  const gate = new Promise<void>((resolve) => (open = resolve));
  const inner = new StoreExecutor(store);
  return { open, run: async (ops, buffer) => (await gate, inner.run(ops, buffer)) };
}

describe('enable waits for a running resync within a bound', () => {
  test('a resync still running at the bound fails the enable, which does not happen later', async () => {
    const volume = await resyncing(3);
    const executor = gated(volume.store as MemoryStore);
    const scheduler = new ResyncScheduler(volume, executor, { yieldMs: 0 });
    const service = new PairService('pair', 'memory', volume, scheduler, null, noFreezer, recordingLog(), null, 10_000, 50);
    const loop = scheduler.start();
    await expect(bounded(service.enable({ wait: true }), 5000, 'enable --wait')).rejects.toMatchObject({
      code: 'ETIMEDOUT',
      message: 'the resync still had 3 blocks left after 0.05 s; the slave was not enabled (cldd enable --wait follows the resync before it asks)',
    });
    // The resync ends after the user was told the enable failed: the pair stays plain.
    executor.open();
    await bounded(loop, 5000, 'the resync');
    expect(volume.state).toBe('plain');
    await new Promise((r) => setImmediate(r));
    expect(volume.state).toBe('plain');
  });
});

describe('progress with waitMs', () => {

  test('answers the moment the resync ends, and at once when none runs', async () => {
    const volume = await resyncing(3);
    const executor = gated(volume.store as MemoryStore);
    const scheduler = new ResyncScheduler(volume, executor, { yieldMs: 0 });
    const service = new PairService('pair', 'memory', volume, scheduler, null, noFreezer, recordingLog());
    void scheduler.start();
    let answered = false;
    const waiting = service.progress(10_000).then((p) => ((answered = true), p));
    // The merge cannot finish before the gate opens: the reply is still held.
    await new Promise((r) => setImmediate(r));
    expect(answered).toBe(false);
    executor.open();
    await expect(bounded(waiting, 5000, 'progress')).resolves.toMatchObject({ state: 'plain', running: false, blocksLeft: 0 });
    // Nothing runs now: no wait at all (the bound is half the asked wait).
    await expect(bounded(service.progress(10_000), 5000, 'progress')).resolves.toMatchObject({ state: 'plain', running: false });
  });

  test('answers after waitMs while the resync runs on', async () => {
    const volume = await resyncing(2);
    const executor = gated(volume.store as MemoryStore);
    const scheduler = new ResyncScheduler(volume, executor, { yieldMs: 0 });
    const service = new PairService('pair', 'memory', volume, scheduler, null, noFreezer, recordingLog());
    const loop = scheduler.start();
    await expect(bounded(service.progress(20), 5000, 'progress')).resolves.toMatchObject({ state: 'resync', running: true, blocksLeft: 2 });
    executor.open();
    await bounded(loop, 5000, 'the resync');
  });
});

describe('FIFREEZE is bounded', () => {
  test('a freeze that does not return fails the enable in time, and is thawed when it does', async () => {
    let release!: () => void;
    const calls: string[] = [];
    const freezer: Freezer = {
      freeze: (m) => {
        calls.push(`freeze ${m}`);
        return new Promise<void>((resolve) => (release = resolve));
      },
      thaw: async (m) => void calls.push(`thaw ${m}`),
    };
    const log = recordingLog();
    const began = performance.now();
    await expect(bounded(freezeWithin(freezer, '/mnt/home', 50, log), 5000, 'freezeWithin')).rejects.toMatchObject({
      code: 'ETIMEDOUT',
      message:
        "FIFREEZE of /mnt/home did not complete within 0.05 s (it writes back through the master; cldd status shows the master's requests); nothing was enabled",
    });
    expect(performance.now() - began).toBeGreaterThanOrEqual(45);
    expect(calls).toEqual(['freeze /mnt/home']);
    release();
    await new Promise((r) => setTimeout(r, 10));
    expect(calls).toEqual(['freeze /mnt/home', 'thaw /mnt/home']);
    expect(log.lines).toEqual(['warn: FIFREEZE of /mnt/home completed after the enable gave up on it; thawed']);
  });

  test('a freeze that returns in time is left frozen for the switch; one that fails says why', async () => {
    const calls: string[] = [];
    const freezer: Freezer = { freeze: async (m) => void calls.push(`freeze ${m}`), thaw: async (m) => void calls.push(`thaw ${m}`) };
    await freezeWithin(freezer, '/srv', FREEZE_LIMIT_MS, recordingLog());
    expect(calls).toEqual(['freeze /srv']);
    const refusing: Freezer = { freeze: async () => Promise.reject(new CldError('EOPNOTSUPP', 'FIFREEZE /srv: not supported')), thaw: async () => {} };
    await expect(freezeWithin(refusing, '/srv', FREEZE_LIMIT_MS, recordingLog())).rejects.toMatchObject({ code: 'EOPNOTSUPP' });
  });
});

describe("disable removes the slave's device beside the resync", () => {
  /**
   * Devices whose slave is a file nobody holds open (so the users check passes); removeSlave
   * records the volume's state and whether the resync runs, and fails while `failRemoval` is set.
   */
  async function fakeDevices(volume: Volume, scheduler: ResyncScheduler) {
    const dir = await mkdtemp(join(tmpdir(), 'cldd-pair-'));
    const path = join(dir, 'slave');
    await writeFile(path, '');
    const calls: string[] = [];
    let slave: DeviceInfo | null = null;
    let failRemoval = false;
    let made = 0;
    const devices: PairDevices = {
      master: { id: 0, path: join(dir, 'master') },
      get slave() {
        return slave;
      },
      recovered: false,
      layout: { queues: 1, depth: 1, zeroCopy: false },
      addSlave: async () => {
        slave = { id: ++made, path };
        calls.push(`add slave ${made}`);
        return slave;
      },
      removeSlave: async () => {
        calls.push(`remove slave ${slave?.id} (${volume.state}, resync ${scheduler.progress().running ? 'running' : 'not running'})`);
        if (failRemoval) throw new CldError('ETIMEDOUT', 'STOP_DEV did not finish within 30 s');
        slave = null;
      },
      stop: async () => {},
      outstanding: () => [],
    };
    const links: LinkKeeper = {
      slaveAdded: async (s) => void calls.push(`link slave ${s.id}`),
      slaveRemoved: async () => void calls.push('unlink slave'),
    };
    return { devices, links, calls, dir, setFailRemoval: (v: boolean) => (failRemoval = v) };
  }

  /** Runs `fn` on a pair in snapshot with its slave added and `blocks` blocks redirected. */
  async function inSnapshot(
    blocks: number,
    fn: (pair: { volume: Volume; scheduler: ResyncScheduler; service: PairService } & Awaited<ReturnType<typeof fakeDevices>>) => Promise<void>,
  ): Promise<void> {
    const volume = await Volume.format(new MemoryStore(8 << 20), { blockSize: BS, name: 'pair' });
    const scheduler = new ResyncScheduler(volume, new StoreExecutor(volume.store), { yieldMs: 0 });
    const fake = await fakeDevices(volume, scheduler);
    try {
      const service = new PairService('pair', 'memory', volume, scheduler, fake.devices, noFreezer, recordingLog(), fake.links);
      await service.enable({ noFreeze: true });
      await new Disk(volume).write(0, new Uint8Array(blocks * BS).fill(7));
      await fn({ volume, scheduler, service, ...fake });
    } finally {
      await rm(fake.dir, { recursive: true, force: true });
    }
  }

  test('the slave goes after the move to resync, with the copy already running', async () => {
    await inSnapshot(3, async ({ volume, scheduler, service, ...fake }) => {
      await expect(service.disable()).resolves.toEqual({ state: 'resync', blocks: 3 });
      expect(fake.calls).toEqual(['add slave 1', 'link slave 1', 'remove slave 1 (resync, resync running)', 'unlink slave']);
      expect(fake.devices.slave).toBeNull();
      await bounded(scheduler.ended(), 5000, 'the resync');
      expect(volume.state).toBe('plain');
    });
  });

  test('a slave whose removal failed serves nothing, and the next enable removes it before adding a fresh one', async () => {
    await inSnapshot(2, async ({ volume, scheduler, service, ...fake }) => {
      fake.setFailRemoval(true);
      await expect(service.disable()).rejects.toMatchObject({
        code: 'ETIMEDOUT',
        message: `the slave is disabled (resync), but its device ${fake.devices.slave?.path} could not be removed: STOP_DEV did not finish within 30 s; it serves no I/O, and the next enable removes it first`,
      });
      expect(fake.devices.slave?.id).toBe(1);
      // The engine refuses the old slave's requests from the move on.
      expect(() => volume.plan({ target: 'slave', op: 'read', offset: 0, length: BS })).toThrow(expect.objectContaining({ code: 'ENODEV' }));
      await bounded(scheduler.ended(), 5000, 'the resync');
      expect(volume.state).toBe('plain');
      // Still failing: the enable changes nothing.
      await expect(service.enable({ noFreeze: true })).rejects.toMatchObject({ code: 'ETIMEDOUT', message: expect.stringMatching(/^the device of the last snapshot's slave .* could not be removed/) });
      expect(volume.state).toBe('plain');
      fake.setFailRemoval(false);
      await expect(service.enable({ noFreeze: true })).resolves.toMatchObject({ epoch: 2 });
      expect(fake.calls).toEqual([
        'add slave 1',
        'link slave 1',
        'remove slave 1 (resync, resync running)',
        'remove slave 1 (plain, resync not running)',
        'remove slave 1 (plain, resync not running)',
        'unlink slave',
        'add slave 2',
        'link slave 2',
      ]);
      expect(fake.devices.slave?.id).toBe(2);
    });
  });
});
