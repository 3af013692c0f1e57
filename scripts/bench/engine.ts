/**
 * Engine benchmark: how fast the engine plans requests (no I/O), how fast it serves them on a
 * memory store, resync throughput on a file store, and the map's memory at 1 TiB.
 * Writes its section of docs/benchmarks.md. Run with `npm run bench`.
 */
import { mkdtemp, open, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BlockMap } from '../../src/engine/block-map.js';
import { Disk, StoreExecutor } from '../../test/support/disk.js';
import { ResyncScheduler } from '../../src/engine/resync.js';
import { Volume } from '../../src/engine/volume.js';
import { FileStore } from '../../src/io/file-store.js';
import { MemoryStore } from '../../src/io/memory-store.js';
import { writeSection } from './report.js';

const KiB = 1024;
const MiB = 1 << 20;
const GiB = 1 << 30;

function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = Math.imul(a ^ (a >>> 15), a | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

async function timeFor<T>(seconds: number, body: () => Promise<number> | number): Promise<number> {
  const end = performance.now() + seconds * 1000;
  let count = 0;
  const start = performance.now();
  while (performance.now() < end) count += await body();
  return (count * 1000) / (performance.now() - start);
}

/**
 * Requests per second the engine plans (plan + finish, no I/O), 4 KiB random. Every chunk is
 * marked for tracking beforehand (main does), so a write is planned at once, as after a chunk's
 * first touch.
 */
async function planRate(volume: Volume, op: 'read' | 'write', seconds: number): Promise<number> {
  const random = rng(7);
  const blocks = volume.layout.blocks;
  const bs = volume.blockSize;
  return timeFor(seconds, () => {
    for (let i = 0; i < 10000; i++) {
      const offset = Math.floor(random() * blocks) * bs;
      const plan = volume.plan({ target: 'master', op, offset, length: bs });
      if (plan instanceof Promise) throw new Error('a write waited for a tracking mark: the chunks were not all marked');
      plan.finish(true);
    }
    return 10000;
  });
}

/**
 * Changed-block tracking's cost on writes: 4 KiB random writes at QD32 on a fresh store, each to
 * a chunk not yet marked in the period (every write waits for the commit of its mark; the 32 of a
 * batch share one), against the same writes on a version 2 store, which has no tracking.
 */
async function firstTouchRates(seconds: number): Promise<{ tracked: number; untracked: number }> {
  const rate = async (version: 2 | 3) => {
    const store = new MemoryStore(64 * GiB);
    const volume = await Volume.format(store, { version });
    const disk = new Disk(volume, new StoreExecutor(store));
    const chunkBlocks = 65536 / volume.blockSize;
    const chunks = Math.floor(volume.layout.blocks / chunkBlocks);
    // Chunks in a random order, each written once: a first touch every time.
    const order = Uint32Array.from({ length: chunks }, (_, i) => i);
    const random = rng(5);
    for (let i = chunks - 1; i > 0; i--) {
      const j = Math.floor(random() * (i + 1));
      [order[i], order[j]] = [order[j], order[i]];
    }
    const data = new Uint8Array(volume.blockSize).fill(0x5a);
    let next = 0;
    return timeFor(seconds, async () => {
      if (next + 32 > chunks) throw new Error('first-touch bench: ran out of unmarked chunks');
      const jobs: Promise<void>[] = [];
      for (let i = 0; i < 32; i++) jobs.push(disk.write((order[next++] * chunkBlocks + Math.floor(random() * chunkBlocks)) * volume.blockSize, data));
      await Promise.all(jobs);
      return 32;
    });
  };
  return { tracked: await rate(3), untracked: await rate(2) };
}

/** Requests per second served end to end on a memory store, 32 in flight. */
async function serveRate(disk: Disk, blocks: number, bs: number, op: 'read' | 'write', seconds: number): Promise<number> {
  const random = rng(11);
  const data = new Uint8Array(bs).fill(0xa5);
  return timeFor(seconds, async () => {
    const jobs: Promise<unknown>[] = [];
    for (let i = 0; i < 32; i++) {
      const offset = Math.floor(random() * blocks) * bs;
      jobs.push(op === 'read' ? disk.read(offset, bs) : disk.write(offset, data));
    }
    await Promise.all(jobs);
    return 32;
  });
}

async function main(): Promise<void> {
  const seconds = Number(process.env.CLDD_BENCH_SECONDS ?? 2);
  const rows: string[][] = [];

  // A 64 GiB sparse memory store: 8M blocks, 260 map pages.
  const store = new MemoryStore(64 * GiB);
  const volume = await Volume.format(store);
  const disk = new Disk(volume, new StoreExecutor(store));
  const blocks = volume.layout.blocks;
  const bs = volume.blockSize;
  // Mark every chunk for changed-block tracking (what the first write to each would do): the rows
  // below measure writes to marked chunks; firstTouchRates the others.
  const markAll = async () => {
    volume.tracking!.mark(0, blocks);
    await volume.commit();
  };
  await markAll();
  rows.push(['plan 4 KiB random read, plain', fmt(await planRate(volume, 'read', seconds)), 'requests/s']);
  rows.push(['plan 4 KiB random write, plain', fmt(await planRate(volume, 'write', seconds)), 'requests/s']);
  rows.push(['serve 4 KiB random read, plain, memory store, QD32', fmt(await serveRate(disk, blocks, bs, 'read', seconds)), 'requests/s']);
  rows.push(['serve 4 KiB random write, plain, memory store, QD32', fmt(await serveRate(disk, blocks, bs, 'write', seconds)), 'requests/s']);

  const touch = await firstTouchRates(seconds);
  rows.push(["serve 4 KiB random write, plain, memory store, QD32, tracking on, each to a chunk's first touch", fmt(touch.tracked), 'requests/s']);
  rows.push(['serve 4 KiB random write, plain, memory store, QD32, the same on a version 2 store (no tracking)', fmt(touch.untracked), 'requests/s']);

  await volume.enable();
  await markAll(); // the snapshot started a new tracking period
  // Redirect about half of a 1 GiB hot region so reads split between the areas.
  const hot = Math.min(blocks, GiB / bs);
  const random = rng(3);
  const page = new Uint8Array(bs);
  for (let i = 0; i < hot / 2; i++) await disk.write(Math.floor(random() * hot) * bs, page);
  await disk.flush();
  rows.push(['plan 4 KiB random read, snapshot', fmt(await planRate(volume, 'read', seconds)), 'requests/s']);
  rows.push(['plan 4 KiB random write, snapshot', fmt(await planRate(volume, 'write', seconds)), 'requests/s']);
  rows.push(['serve 4 KiB random read, snapshot, memory store, QD32', fmt(await serveRate(disk, hot, bs, 'read', seconds)), 'requests/s']);
  rows.push(['serve 4 KiB random write, snapshot, memory store, QD32', fmt(await serveRate(disk, hot, bs, 'write', seconds)), 'requests/s']);

  // Planning a 1 MiB read across alternating runs (worst case for extent splitting).
  const splitRate = await timeFor(seconds, () => {
    for (let i = 0; i < 1000; i++) {
      const plan = volume.plan({ target: 'master', op: 'read', offset: 0, length: MiB }) as unknown as { finish(ok: boolean): void };
      plan.finish(true);
    }
    return 1000;
  });
  rows.push(['plan 1 MiB read over mixed runs, snapshot', fmt(splitRate), 'requests/s']);

  // Resync throughput on a file store: changes in long runs, and scattered 4 KiB blocks (what
  // random writes leave), which the merges copy window by window rather than block by block.
  const areaMiB = Number(process.env.CLDD_BENCH_RESYNC_MB ?? 1024);
  const where = process.env.CLDD_BENCH_FS ?? 'tmpdir';
  for (const pattern of ['runs', 'scattered'] as const) {
    const r = await resyncRate(areaMiB, pattern);
    const what = pattern === 'runs' ? '256 KiB runs over a quarter of the area' : 'scattered 4 KiB blocks, one in eight';
    rows.push([`resync ${r.mib.toFixed(0)} MiB in ${what}, file store (${where})`, fmt(r.rate), 'MiB/s']);
  }

  // Map memory for a 1 TiB data area at 4 KiB blocks, every block redirected.
  const map = new BlockMap((1024 * GiB) / 4096, 4096);
  map.assign(0, map.blocks, true);
  rows.push(['map of a 1 TiB data area at 4 KiB blocks, every block redirected', (map.residentBytes / MiB).toFixed(1), 'MiB']);

  const table = ['| measurement | value | unit |', '|---|---:|---|', ...rows.map((r) => `| ${r.join(' | ')} |`)].join('\n');
  const text = [
    `Measured ${new Date().toISOString().slice(0, 10)} on ${process.platform} ${process.arch}, Node ${process.version}, ${seconds} s per figure.`,
    'Planning figures are plan() + finish() with no I/O; serving figures add the memory store.',
    '',
    table,
  ].join('\n');
  console.log(text);
  await writeSection('engine', 'Engine', text);
}

function fmt(n: number): string {
  return n >= 100 ? Math.round(n).toLocaleString('en-US') : n.toFixed(1);
}

main().catch((err) => {
  console.error(`bench: ${err instanceof Error ? err.message : String(err)}`);
  process.exit(1);
});

/**
 * Resync throughput on a file store of `areaMiB` per area: enabled, changed (256 KiB runs over a
 * quarter of the area, or one 4 KiB block in eight at random), disabled, merged back.
 */
async function resyncRate(areaMiB: number, pattern: 'runs' | 'scattered'): Promise<{ mib: number; rate: number }> {
  const dir = await mkdtemp(join(tmpdir(), 'cldd-bench-'));
  try {
    const path = join(dir, 'store.img');
    const fh = await open(path, 'w');
    await fh.truncate(areaMiB * MiB * 2 + 8 * MiB);
    await fh.close();
    const store = await FileStore.open(path);
    const volume = await Volume.format(store);
    const disk = new Disk(volume);
    await volume.enable();
    const blocks = volume.layout.blocks;
    const bs = volume.blockSize;
    const r = rng(5);
    if (pattern === 'runs') {
      const chunk = new Uint8Array(256 * KiB).fill(0x5a);
      const run = chunk.length / bs;
      let changed = 0;
      while (changed < blocks / 4) {
        const start = Math.floor(r() * (blocks / run)) * run;
        if (!volume.map.test(start)) changed += run;
        await disk.write(start * bs, chunk);
      }
    } else {
      const block = new Uint8Array(bs).fill(0x5a);
      for (let i = 0; i < blocks / 8; i++) await disk.write(Math.floor(r() * blocks) * bs, block);
    }
    await disk.flush();
    const redirected = volume.map.count;
    await volume.disable();
    const scheduler = new ResyncScheduler(volume, new StoreExecutor(store));
    const t0 = performance.now();
    await scheduler.start();
    const seconds = (performance.now() - t0) / 1000;
    await volume.close();
    await store.close();
    const mib = (redirected * bs) / MiB;
    return { mib, rate: mib / seconds };
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}
