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
 * Each queue gets one CPU of those blk-mq sends it requests from (GET_QUEUE_AFFINITY) that this
 * process may run on, spread by device id so that a pair's two devices, and several pairs, do
 * not all take the first. A queue with no such CPU (a cpuset that excludes them all, a kernel
 * that did not answer) is not pinned.
 */
import { readFileSync } from 'node:fs';

/** One CPU per queue (-1: not pinned), from each queue's CPUs (null: unknown) and the allowed ones (null: all). */
export function servingCpus(queueCpus: readonly (readonly number[] | null)[], allowed: ReadonlySet<number> | null, devId: number): number[] {
  return queueCpus.map((cpus, q) => {
    const usable = (cpus ?? []).filter((c) => allowed === null || allowed.has(c));
    return usable.length > 0 ? usable[(devId + q) % usable.length] : -1;
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
