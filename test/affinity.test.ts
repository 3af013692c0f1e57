/**
 * Where the queue threads run (src/ublk/affinity.ts): one CPU per queue, of those blk-mq sends it
 * requests from and this process may use. The VM check `filesystem` sees the threads pinned.
 */
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { expect, test } from 'vitest';
import { allowedCpus, parseCpuList, servingCpus } from '../src/ublk/affinity.js';

test("each queue gets a CPU that sends its requests to another queue, spread by device id, and only CPUs the process may use", () => {
  // One queue over four CPUs: a pair's master (id 0) and slave (id 1) take different ones.
  expect(servingCpus([[0, 1, 2, 3]], null, 0)).toEqual([0]);
  expect(servingCpus([[0, 1, 2, 3]], null, 1)).toEqual([1]);
  expect(servingCpus([[0, 1, 2, 3]], null, 6)).toEqual([2]);
  // Two queues, one CPU each: each thread on the other queue's CPU, never beside its submitters.
  expect(servingCpus([[0], [1]], null, 0)).toEqual([1, 0]);
  expect(servingCpus([[0], [1]], null, 1)).toEqual([1, 0]);
  // Two queues, as blk-mq splits four CPUs between them.
  expect(servingCpus([[0, 1], [2, 3]], null, 0)).toEqual([2, 1]);
  expect(servingCpus([[0, 1], [2, 3]], null, 1)).toEqual([3, 0]);
  // One queue per CPU: each CPU runs one thread.
  const four = servingCpus([[0], [1], [2], [3]], null, 0);
  four.forEach((cpu, q) => expect(cpu).not.toBe(q));
  expect(new Set(four).size).toBe(4);
  // A cpuset that leaves the process CPUs 2 and 3 only.
  expect(servingCpus([[0, 1, 2, 3]], new Set([2, 3]), 0)).toEqual([2]);
  // Where a queue's own CPUs are all the process may use, it takes one of them.
  expect(servingCpus([[0, 1], [2, 3]], new Set([2, 3]), 0)).toEqual([2, 3]);
  // A queue whose CPUs are unknown is not pinned; nor is any where no CPU is usable.
  expect(servingCpus([null, [5]], null, 0)).toEqual([-1, 5]);
  expect(servingCpus([null, [4], [5]], null, 0)).toEqual([-1, 5, 4]);
  expect(servingCpus([[0, 1]], new Set([7]), 0)).toEqual([-1]);
});

test('the kernel CPU list format parses; anything else is unknown', () => {
  expect([...parseCpuList('0-3,8,10-11\n')!]).toEqual([0, 1, 2, 3, 8, 10, 11]);
  expect([...parseCpuList('5')!]).toEqual([5]);
  for (const bad of ['', '3-1', 'a', '1,,2', '0-99999999']) expect(parseCpuList(bad), bad).toBeNull();
});

test("the process's allowed CPUs come from /proc; without them, all are allowed", async () => {
  const dir = await mkdtemp(join(tmpdir(), 'cldd-affinity-'));
  try {
    const status = join(dir, 'status');
    await writeFile(status, 'Name:\tnode\nCpus_allowed:\t0f\nCpus_allowed_list:\t0-1,3\nMems_allowed:\t1\n');
    expect([...allowedCpus(status)!]).toEqual([0, 1, 3]);
    expect(allowedCpus(join(dir, 'missing'))).toBeNull();
    // This process's own: at least one CPU.
    expect(allowedCpus()!.size).toBeGreaterThan(0);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});
