/**
 * The request executor of the ublk devices (src/ublk/device.ts) on any machine: a device over a
 * fake queue (test/support/fake-queue.ts) that hands every request to the engine, as the queue
 * threads do for what the fast path does not serve, and runs the plans' extents on the store.
 */
import { constants } from 'node:os';
import { describe, expect, test, vi } from 'vitest';
import { Volume } from '../src/engine/volume.js';
import { MemoryStore } from '../src/io/memory-store.js';
import { DEFAULT_QUEUE_OPTIONS, UblkDevice } from '../src/ublk/device.js';
import { UBLK_F } from '../src/ublk/uapi.js';
import { FakeQueue, fakeControl } from './support/fake-queue.js';

const BS = 4096;

async function served(version?: 2 | 3) {
  const store = new MemoryStore(8 << 20);
  const volume = await Volume.format(store, { blockSize: BS, name: 'device', version });
  const queue = new FakeQueue(store);
  const control = fakeControl(queue);
  const device = await UblkDevice.create(control, volume, -1, 'master', {
    ...DEFAULT_QUEUE_OPTIONS,
    depth: 8,
    flags: UBLK_F.USER_RECOVERY | UBLK_F.USER_COPY,
    native: queue.open,
  });
  return { store, volume, queue, control, device };
}

const block = (n: number, fill: number) => new Uint8Array(n * BS).fill(fill);

describe('a device over a fake queue', () => {
  test('writes, a flush and reads go through the engine and complete once each; stop deletes the device', async () => {
    const { queue, control, device, volume } = await served();
    expect(control.calls).toEqual(['ADD_DEV', 'SET_PARAMS', 'START_DEV']);
    const writes = [queue.request('write', 0, block(2, 1)), queue.request('write', 4 * BS, block(1, 2))];
    expect(await Promise.all(writes.map((w) => w.result))).toEqual([0, 0]);
    expect(await queue.request('flush', 0, 0).result).toBe(0);
    const read = queue.request('read', 0, 5 * BS);
    expect(await read.result).toBe(0);
    expect([...read.buffer.subarray(0, 2 * BS)].every((b) => b === 1)).toBe(true);
    expect([...read.buffer.subarray(2 * BS, 4 * BS)].every((b) => b === 0)).toBe(true);
    expect([...read.buffer.subarray(4 * BS)].every((b) => b === 2)).toBe(true);
    expect(queue.outstanding).toBe(0);
    // A plan without ordering needs finishes after its completion, with the next delivery.
    await queue.delivered();
    expect(volume.counters).toMatchObject({ reads: 1, writes: 2, flushes: 1 });
    await device.stop();
    expect(control.calls).toEqual(['ADD_DEV', 'SET_PARAMS', 'START_DEV', 'STOP_DEV', 'DEL_DEV']);
  });

  test('a first touch in a snapshot is redirected before it completes, and a flush commits it through the queue', async () => {
    const { store, queue, device, volume } = await served();
    await volume.enable();
    const write = queue.request('write', 3 * BS, block(1, 9));
    expect(await write.result).toBe(0);
    // Completed: a read issued now must find the redirect.
    expect(volume.map.test(3)).toBe(true);
    const commitsBefore = volume.counters.commits;
    expect(await queue.request('flush', 0, 0).result).toBe(0);
    // The queue completed the flush once the commit's steps were done; the engine hears of it next.
    await queue.delivered();
    expect(volume.counters.commits).toBe(commitsBefore + 1);
    expect(queue.commitsRun).toBe(1);
    // Durable: the store as a new process would open it.
    const reopened = await Volume.open(store);
    expect(reopened.state).toBe('snapshot');
    expect(reopened.map.test(3)).toBe(true);
    const read = queue.request('read', 3 * BS, BS);
    expect(await read.result).toBe(0);
    expect(read.buffer.every((b) => b === 9)).toBe(true);
    await device.stop();
  });

  test('a request the engine refuses completes with its errno and the rest go on', async () => {
    const { queue, device, volume } = await served(2);
    const past = queue.request('write', volume.capacity, block(1, 1));
    const crooked = queue.request('discard', 512, BS);
    const fine = queue.request('write', 0, block(1, 5));
    expect(await past.result).toBe(-constants.errno.EINVAL);
    expect(await crooked.result).toBe(-constants.errno.EINVAL);
    expect(await fine.result).toBe(0);
    await device.stop();
  });

  test('a write whose backing I/O fails completes with the I/O error, and the map is left as it was', async () => {
    const { store, queue, device, volume } = await served(2);
    await volume.enable();
    const write = store.write.bind(store);
    store.write = async (data, offset) => {
      if (offset >= volume.layout.changeOffset) throw Object.assign(new Error('the disk said no'), { code: 'EIO' });
      return write(data, offset);
    };
    expect(await queue.request('write', 0, block(1, 7)).result).toBe(-constants.errno.EIO);
    expect(volume.map.test(0)).toBe(false);
    expect(volume.counters.errors).toBe(1);
    store.write = write;
    await device.stop();
  });

  test('a tag taken out of service is reported when it happens, with what each queue lost', async () => {
    const { queue, device } = await served(2);
    const reports: string[] = [];
    // The watchdog's ticks, one at a time (its interval is stallMs / 4, at least 100 ms).
    vi.useFakeTimers({ toFake: ['setInterval', 'clearInterval'] });
    try {
      device.watch({ stallMs: 400, report: () => {}, outOfService: (m) => reports.push(m) });
      vi.advanceTimersByTime(100);
      expect(reports).toEqual([]);
      queue.takeOutOfService(5, 'ublk device 7 queue 0 tag 5: Invalid argument');
      vi.advanceTimersByTime(100);
      expect(reports).toEqual(['master /dev/ublkb7: ublk device 7 queue 0 tag 5: Invalid argument (queue 0: 1 of 8 tags out of service)']);
      // Said once: the next ticks find the same error.
      vi.advanceTimersByTime(300);
      expect(reports).toHaveLength(1);
      queue.takeOutOfService(6, 'ublk device 7 queue 0 tag 6: Invalid argument');
      vi.advanceTimersByTime(100);
      expect(reports[1]).toBe('master /dev/ublkb7: ublk device 7 queue 0 tag 6: Invalid argument (queue 0: 2 of 8 tags out of service)');
    } finally {
      vi.useRealTimers();
    }
    // The queue serves on with the others.
    expect(await queue.request('write', 0, block(1, 3)).result).toBe(0);
    await device.stop();
  });

  test('a request still waiting for its plan when the device stops is finished as failed, not left in flight', async () => {
    const { queue, device, volume } = await served(2);
    await volume.enable();
    expect(await queue.request('write', 0, block(1, 1)).result).toBe(0);
    await volume.disable();
    // A merge holds block 0; a master write to it waits for its plan.
    const merge = (await volume.beginMerge(16))!;
    queue.request('write', 0, block(1, 4));
    await queue.delivered();
    expect(device.outstanding()).toMatchObject([{ op: 'write', offset: 0, stage: expect.stringMatching(/^its plan/) }]);
    await device.stop();
    // The merge ends; the write's plan comes, after the queues are gone.
    merge.finish(true);
    volume.drainLimitMs = 1000;
    await expect(volume.close()).resolves.toBeUndefined();
  });
});
