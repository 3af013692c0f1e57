/**
 * Mutation fuzzer over the metadata of valid stores. Each trial takes a cleanly closed store (in
 * plain, snapshot or resync; 4, 8 and 64 KiB blocks; one to three map pages) with stamped blocks
 * whose committed contents are known, applies one fault to its metadata, and holds check and open
 * to what the volume would serve:
 *   - check never writes, and calls the store clean exactly when open accepts it;
 *   - an open that succeeds serves the committed state: the state, and every probed block of
 *     the master (and the slave in snapshot) as committed; after it, check finds nothing;
 *   - an open that refuses says CLDD_CORRUPT (or CLDD_FOREIGN when no signature is left) and
 *     changes nothing.
 * Faults are single: bits flipped, a block zeroed or cut short, a garbage sector, slots swapped
 * between pages or within one, superblock copies swapped or one written over the other, a block
 * reverted to an earlier content (a write the drive lost), the store truncated. Version 1 stores
 * are left out: their map cannot be verified, which check says.
 * Replay a failure with CLDD_SEED=<seed>; scale with CLDD_MUTATIONS=<n>.
 */
import { describe, expect, test } from 'vitest';
import { check } from '../src/engine/check.js';
import { Disk, StoreExecutor } from './support/disk.js';
import { mapSlotOffset, metadataPages, superblockOffset, type Layout, type VolumeState } from '../src/format/format.js';
import type { Extent } from '../src/engine/change-tracking.js';
import { ResyncScheduler } from '../src/engine/resync.js';
import { Volume } from '../src/engine/volume.js';
import { MemoryStore } from '../src/io/memory-store.js';
import { MutationRecorder } from './support/mutation-recorder.js';
import { between, pick, rng, seedFromEnv } from './support/random.js';
import { SECTOR, stamped } from './support/stamp.js';

const MiB = 1 << 20;
const NOW = () => 1_700_000_000_000;

interface Config {
  label: string;
  blockSize: number;
  /** Blocks per area wanted: enough for the map pages the label says. */
  blocks: number;
}

const CONFIGS: Config[] = [
  { label: '4 KiB blocks, one map page', blockSize: 4096, blocks: 1500 },
  { label: '4 KiB blocks, three map pages', blockSize: 4096, blocks: 2 * 32256 + 2000 },
  { label: '8 KiB blocks, two map pages', blockSize: 8192, blocks: 65024 + 500 },
  { label: '64 KiB blocks, two map pages', blockSize: 65536, blocks: 523776 + 50 },
];
const STATES: VolumeState[] = ['plain', 'snapshot', 'resync'];

/** A closed store, what it must serve, and every earlier content of each metadata block. */
interface Image {
  label: string;
  store: MemoryStore;
  layout: Layout;
  state: VolumeState;
  /** Block -> expected bytes, for the blocks probed after an open. */
  master: Map<number, Uint8Array>;
  slave: Map<number, Uint8Array> | null;
  /** Offsets of the metadata blocks: both superblock copies, then slots in page order. */
  metadata: number[];
  /** Per metadata block, the contents it held before its current one (oldest first). */
  history: Uint8Array[][];
  /** The tracking sets as committed: changed since the last snapshot, and the last delta. */
  tracking: { since: number; changed: Extent[]; delta: Extent[] | null };
}

async function build(config: Config, state: VolumeState): Promise<Image> {
  const { blockSize } = config;
  const store = new MemoryStore(4 * MiB + 2 * config.blocks * blockSize);
  let volume = await Volume.format(store, { blockSize, name: 'fuzz', now: NOW });
  const { layout } = volume;
  const { bitsPerPage, blocks, mapPages } = layout;
  expect(mapPages, config.label).toBe(Math.ceil(config.blocks / bitsPerPage));
  const spb = blockSize / SECTOR;

  // Blocks at the start and end of every page, and the last one; probes never written between.
  const touched = new Set<number>();
  const probes = new Set<number>();
  for (let p = 0; p < mapPages; p++) {
    const base = p * bitsPerPage;
    for (const b of [base, base + 1, base + 6, base + 9, base + 12, base + 13, base + bitsPerPage - 1]) if (b < blocks) touched.add(b);
    for (const b of [base + 3, base + 7]) if (b < blocks) probes.add(b);
  }
  touched.add(blocks - 1);
  const list = [...touched].sort((a, b) => a - b);
  const master = new Map<number, number>(list.map((b) => [b, 0]));
  let slave: Map<number, number> | null = null;

  const metadata = [superblockOffset(0, blockSize), superblockOffset(1, blockSize)];
  // The redirect pages, then the tracking pages of both sets.
  for (let p = 0; p < metadataPages(layout); p++) metadata.push(mapSlotOffset(layout, p, 0), mapSlotOffset(layout, p, 1));
  const seen: Uint8Array[][] = metadata.map(() => []);
  const remember = () => {
    metadata.forEach((offset, i) => {
      const buf = new Uint8Array(blockSize);
      store.readSync(buf, offset);
      const last = seen[i][seen[i].length - 1];
      if (!last || !Buffer.from(last).equals(Buffer.from(buf))) seen[i].push(buf);
    });
  };
  remember();

  let disk = new Disk(volume);
  let version = 0;
  const write = async (which: (i: number) => boolean) => {
    version++;
    for (const [i, b] of list.entries()) {
      if (!which(i)) continue;
      await disk.write(b * blockSize, stamped(b * spb, spb, version));
      master.set(b, version);
    }
    await disk.flush();
    remember();
  };

  await write(() => true);
  await volume.enable();
  slave = new Map(master);
  remember();
  await write((i) => i % 2 === 0);
  await write((i) => i % 3 === 0);
  if (state !== 'snapshot') {
    await volume.disable();
    slave = null;
    remember();
    // Merge a run or two, then a master write to a block still redirected (it clears the bit).
    for (let k = 0; k < mapPages; k++) {
      const merge = await volume.beginMerge(1);
      if (!merge) break;
      const buffer = new Uint8Array(merge.bufferLength);
      const executor = new StoreExecutor(store);
      await executor.run(merge.reads, buffer);
      await executor.run(merge.writes, buffer);
      merge.finish(true);
    }
    await volume.commit();
    remember();
    await write((i) => i === list.length - 1);
    expect(volume.state, config.label).toBe('resync');
    expect(volume.map.count, config.label).toBeGreaterThan(1);
    if (state === 'plain') {
      await new ResyncScheduler(volume, new StoreExecutor(store), { yieldMs: 0 }).start();
      remember();
      await write((i) => i % 4 === 1);
    }
  }
  await volume.close();
  remember();
  // Reopened and closed once more, as a daemon restart would.
  volume = await Volume.open(store, { now: NOW });
  disk = new Disk(volume);
  expect(volume.state, config.label).toBe(state);
  const t = volume.tracking!;
  const tracking = { since: t.since, changed: t.changedExtents(), delta: t.deltaExtents() };
  expect(tracking.changed.length, `${config.label}: chunks changed since the snapshot`).toBeGreaterThan(0);
  expect(tracking.delta?.length, `${config.label}: chunks of the last delta`).toBeGreaterThan(0);
  await volume.close();
  remember();

  const bytes = (b: number, v: number) => (v === 0 ? new Uint8Array(blockSize) : stamped(b * spb, spb, v));
  const expectMaster = new Map<number, Uint8Array>();
  for (const [b, v] of master) expectMaster.set(b, bytes(b, v));
  for (const b of probes) expectMaster.set(b, bytes(b, 0));
  let expectSlave: Map<number, Uint8Array> | null = null;
  if (slave) {
    expectSlave = new Map();
    for (const [b, v] of slave) expectSlave.set(b, bytes(b, v));
  }
  // The current content of each block is not history.
  const history = seen.map((contents) => contents.slice(0, -1));
  return { label: `${config.label}, ${state}`, store, layout, state, master: expectMaster, slave: expectSlave, metadata, history, tracking };
}

type Fault = 'flip' | 'zero' | 'zero-span' | 'tail' | 'garbage' | 'swap-pages' | 'swap-slots' | 'swap-superblocks' | 'lost-write' | 'truncate';
const FAULTS: [Fault, number][] = [
  ['flip', 24],
  ['zero', 10],
  ['zero-span', 6],
  ['tail', 8],
  ['garbage', 8],
  ['swap-pages', 10],
  ['swap-slots', 5],
  ['swap-superblocks', 5],
  ['lost-write', 25],
  ['truncate', 5],
];

/** Applies one random fault to a copy of the image; returns the store and what was done. */
function mutate(random: () => number, image: Image): { store: MemoryStore; fault: Fault; what: string } {
  const { layout, metadata } = image;
  const bs = layout.blockSize;
  let roll = random() * FAULTS.reduce((n, [, w]) => n + w, 0);
  const fault = (FAULTS.find(([, w]) => (roll -= w) < 0) ?? FAULTS[0])[0];
  const read = (store: MemoryStore, offset: number) => {
    const buf = new Uint8Array(bs);
    store.readSync(buf, offset);
    return buf;
  };
  // A third of the faults hit a superblock copy, the rest a map slot.
  const anyBlock = () => (random() < 1 / 3 ? between(random, 0, 1) : between(random, 2, metadata.length - 1));
  const name = (i: number) => (i < 2 ? `superblock copy ${i}` : `page ${(i - 2) >> 1} slot ${(i - 2) & 1}`);

  if (fault === 'truncate') {
    const size = between(random, 0, layout.storeSize - 1);
    const store = new MemoryStore(size);
    const keep = Math.min(size, layout.dataOffset);
    const buf = new Uint8Array(keep);
    image.store.readSync(buf, 0);
    store.writeSync(buf, 0);
    return { store, fault, what: `truncated to ${size} bytes` };
  }
  const store = MemoryStore.copyOf(image.store);
  switch (fault) {
    case 'flip': {
      const i = anyBlock();
      // In a superblock only the first sector is read; aim there mostly.
      const span = i < 2 && random() < 0.9 ? 512 : random() < 0.3 ? 64 : bs;
      const buf = read(store, metadata[i]);
      const bits = between(random, 1, 8);
      const at: number[] = [];
      for (let k = 0; k < bits; k++) {
        const bit = between(random, 0, span * 8 - 1);
        buf[bit >> 3] ^= 1 << (bit & 7);
        at.push(bit);
      }
      store.writeSync(buf, metadata[i]);
      return { store, fault, what: `bits ${at.join(',')} of ${name(i)} flipped` };
    }
    case 'zero': {
      const i = anyBlock();
      store.writeSync(new Uint8Array(bs), metadata[i]);
      return { store, fault, what: `${name(i)} zeroed` };
    }
    case 'zero-span': {
      // One misdirected or zeroed write of 2-3 blocks: the metadata blocks lie side by side, so
      // it can take a superblock copy and the slot after it (the newest of the last commit).
      const n = between(random, 2, 3);
      const i = between(random, 0, metadata.length - n);
      store.writeSync(new Uint8Array(n * bs), metadata[i]);
      return { store, fault, what: `${name(i)} to ${name(i + n - 1)} zeroed` };
    }
    case 'tail': {
      const i = anyBlock();
      const from = between(random, 1, (i < 2 ? 512 : bs) - 1);
      store.zeroSync(metadata[i] + from, bs - from);
      return { store, fault, what: `${name(i)} zeroed from byte ${from}` };
    }
    case 'garbage': {
      const i = anyBlock();
      const sector = i < 2 ? 0 : between(random, 0, bs / SECTOR - 1);
      const junk = Uint8Array.from({ length: SECTOR }, () => Math.floor(random() * 256));
      store.writeSync(junk, metadata[i] + sector * SECTOR);
      return { store, fault, what: `sector ${sector} of ${name(i)} is garbage` };
    }
    case 'swap-pages': {
      const pages = metadataPages(layout);
      const p = between(random, 0, pages - 1);
      const q = (p + between(random, 1, pages - 1)) % pages;
      const a = 2 + 2 * p + between(random, 0, 1);
      const b = 2 + 2 * q + between(random, 0, 1);
      const [x, y] = [read(store, metadata[a]), read(store, metadata[b])];
      if (random() < 0.5) {
        store.writeSync(y, metadata[a]);
        store.writeSync(x, metadata[b]);
        return { store, fault, what: `${name(a)} and ${name(b)} exchanged` };
      }
      store.writeSync(y, metadata[a]);
      return { store, fault, what: `${name(b)} written over ${name(a)}` };
    }
    case 'swap-slots': {
      const p = between(random, 0, metadataPages(layout) - 1);
      const [x, y] = [read(store, metadata[2 + 2 * p]), read(store, metadata[3 + 2 * p])];
      store.writeSync(y, metadata[2 + 2 * p]);
      store.writeSync(x, metadata[3 + 2 * p]);
      return { store, fault, what: `the slots of page ${p} exchanged` };
    }
    case 'swap-superblocks': {
      const [x, y] = [read(store, metadata[0]), read(store, metadata[1])];
      if (random() < 0.5) {
        store.writeSync(y, metadata[0]);
        store.writeSync(x, metadata[1]);
        return { store, fault, what: 'the superblock copies exchanged' };
      }
      const from = between(random, 0, 1);
      store.writeSync(from ? y : x, metadata[1 - from]);
      return { store, fault, what: `superblock copy ${from} written over copy ${1 - from}` };
    }
    case 'lost-write': {
      const candidates = metadata.map((_, i) => i).filter((i) => image.history[i].length > 0);
      const i = pick(random, candidates);
      const k = between(random, 0, image.history[i].length - 1);
      store.writeSync(image.history[i][k], metadata[i]);
      return { store, fault, what: `${name(i)} back to its content ${k} (of ${image.history[i].length} earlier)` };
    }
  }
  throw new Error(`unhandled fault ${fault}`);
}

function metadataBytes(store: MemoryStore, layout: Layout): Buffer {
  const buf = Buffer.alloc(Math.min(store.size, layout.dataOffset));
  store.readSync(buf, 0);
  return buf;
}

/** Runs check and open on a mutated store and holds them to the committed state. */
async function judge(image: Image, store: MemoryStore): Promise<'opened' | 'refused'> {
  const guard = new MutationRecorder(store);
  const report = await check(guard);
  expect(guard.mutations, 'check must not write').toEqual([]);
  const findings = report.findings.map((f) => `${f.severity}: ${f.message}`).join('\n  ');
  const before = metadataBytes(store, image.layout);
  let volume: Volume;
  try {
    volume = await Volume.open(store, { now: NOW });
  } catch (err) {
    const code = (err as { code?: string }).code;
    expect(['CLDD_CORRUPT', 'CLDD_FOREIGN'], `open refused with ${code}: ${(err as Error).message}`).toContain(code);
    expect(report.clean, `open refused (${(err as Error).message}) but check said clean:\n  ${findings}`).toBe(false);
    expect(report.foreign, 'check and open agree on a foreign store').toBe(code === 'CLDD_FOREIGN');
    expect(metadataBytes(store, image.layout).equals(before), 'a refused open wrote nothing').toBe(true);
    return 'refused';
  }
  expect(report.clean, `open succeeded but check said damaged:\n  ${findings}`).toBe(true);
  expect(volume.state, 'the committed state').toBe(image.state);
  const disk = new Disk(volume);
  const bs = image.layout.blockSize;
  for (const [target, blocks] of [
    ['master', image.master],
    ['slave', image.slave],
  ] as const) {
    if (!blocks) continue;
    for (const [b, want] of blocks) {
      const got = await disk.read(b * bs, bs, target);
      if (!Buffer.from(got).equals(Buffer.from(want))) {
        throw new Error(`${target} block ${b} differs from the committed state although check said clean:\n  ${findings}`);
      }
    }
  }
  // Changed-block tracking as committed: never a smaller set (a backup would miss data).
  const t = volume.tracking!;
  expect({ since: t.since, changed: t.changedExtents(), delta: t.deltaExtents() }, 'the committed tracking sets').toEqual(image.tracking);
  await volume.close();
  const after = await check(store);
  expect(after.findings, 'check after open repaired the store').toEqual([]);
  return 'opened';
}

describe('metadata fuzz', () => {
  test('single faults in metadata are repaired or refused, never served as another state', async () => {
    const seed = seedFromEnv();
    const target = Number(process.env.CLDD_MUTATIONS ?? 3000);
    console.log(`metadata fuzz seed: ${seed} (replay with CLDD_SEED=${seed})`);
    const random = rng(seed);
    const started = performance.now();
    const images: Image[] = [];
    for (const config of CONFIGS) for (const state of STATES) images.push(await build(config, state));
    const built = performance.now();
    const tally = new Map<string, number>();
    let mutations = 0;
    for (; mutations < target; mutations++) {
      const image = pick(random, images);
      const { store, fault, what } = mutate(random, image);
      try {
        const verdict = await judge(image, store);
        tally.set(`${fault} ${verdict}`, (tally.get(`${fault} ${verdict}`) ?? 0) + 1);
      } catch (err) {
        (err as Error).message = `[seed ${seed}, mutation ${mutations}] ${image.label}: ${what}: ${(err as Error).message}`;
        throw err;
      }
    }
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    console.log(`mutations: ${mutations}`);
    console.log(
      `metadata fuzz: ${images.length} images built in ${((built - started) / 1000).toFixed(1)} s, ${seconds} s in all, seed ${seed}; ` +
        [...tally].sort().map(([k, n]) => `${k} ${n}`).join(', '),
    );
    expect(mutations).toBe(target);
  }, 300_000);
});
