/**
 * Which CPU each queue's thread runs on. A queue thread is woken for every request, and the
 * requests of a sync writer come one at a time, each issued only once the one before it
 * completed: a thread the scheduler may move, or wake on another CPU than the one it ran on,
 * adds that latency to every request. Measured in the test VM (6.12, TCG, 2 vCPUs, ext4 on the
 * master over ext4 on brd, fio 4 KiB random writes through the page cache, each followed by
 * fsync, one job, six rounds alternating with an unpinned pair and the reference C server, which
 * pins its queue threads the same way): pinned 224-368 IOPS (median 285), unpinned 174-282
 * (194), the C server 225-469 (293).
 *
 * Each queue's thread gets a CPU the process may use whose requests blk-mq sends to another
 * queue (GET_QUEUE_AFFINITY), not one of its own queue's. A thread on its submitters' CPU takes
 * that CPU from them while it serves or polls (docs/serving.md, "The queue thread's wait"), and
 * each request then costs two switches on one CPU. Measured in the same VM (2 vCPUs, a pair with
 * two queues, one CPU each; fio 4 KiB, 4 s per job, 3 rounds; IOPS), with the two threads moved
 * by `taskset` (docs/benchmarks.md, "Several queues"):
 *
 * | threads | reads QD1 | writes QD1 | writes QD32 | 2 jobs x QD16 writes | 2 jobs x QD16 reads |
 * |---|---:|---:|---:|---:|---:|
 * | each on its own queue's CPU | 5.0-5.8k | 4.8-5.2k | 36-41k | 59-64k | 70-71k |
 * | each on the other queue's | 14.5-17.5k | 11.6-14.8k | 71-85k | 64-71k | 71-79k |
 * | not pinned | 13.0-13.7k | 11.6-12.9k | 67-72k | 60-62k | 68-72k |
 * | one queue, for comparison | 13.4-15.1k | 12.9-13.5k | 70-72k | 49-62k | 56-60k |
 *
 * On 7.3 the old placement cost as much at QD1 (reads 4.7k against 13.9-17.0k now), and two
 * writers gained nothing from the second queue there (docs/benchmarks.md, "Several queues").
 *
 * A queue whose requests come from every CPU the process may use (one queue, the default) gets
 * one of them. The choice is spread by device id so that a pair's two devices, and several pairs,
 * do not all take the first. A queue whose CPUs are unknown (a kernel that did not answer), or
 * with no CPU to take, is not pinned.
 */
import { readFileSync } from 'node:fs';

/** One CPU per queue (-1: not pinned), from each queue's CPUs (null: unknown) and the allowed ones (null: all). */
export function servingCpus(queueCpus: readonly (readonly number[] | null)[], allowed: ReadonlySet<number> | null, devId: number): number[] {
  const known = queueCpus.flatMap((cpus) => cpus ?? []);
  // The CPUs the process may use: all of them, when the kernel's map and /proc both say.
  const usable = [...new Set(known.filter((c) => allowed === null || allowed.has(c)))].sort((a, b) => a - b);
  return queueCpus.map((cpus, q) => {
    if (cpus === null) return -1;
    const others = usable.filter((c) => !cpus.includes(c));
    const choice = others.length > 0 ? others : usable;
    return choice.length > 0 ? choice[(devId + q) % choice.length] : -1;
  });
}

/** A kernel CPU list ("0-3,8,10-11") as a set; null when it does not parse. */
export function parseCpuList(text: string): Set<number> | null {
  const cpus = new Set<number>();
  for (const part of text.trim().split(',')) {
    const m = /^(\d+)(?:-(\d+))?$/.exec(part);
    if (!m) return null;
    const [from, to] = [Number(m[1]), Number(m[2] ?? m[1])];
    if (to < from || to - from > 1 << 16) return null;
    for (let c = from; c <= to; c++) cpus.add(c);
  }
  return cpus;
}

/** The CPUs this process may run on (its cpuset and affinity), or null when /proc does not say. */
export function allowedCpus(status = '/proc/self/status'): Set<number> | null {
  try {
    const line = /^Cpus_allowed_list:\s*(.+)$/m.exec(readFileSync(status, 'utf8'));
    return line ? parseCpuList(line[1]) : null;
  } catch {
    return null;
  }
}
