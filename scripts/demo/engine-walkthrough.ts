/**
 * The cldd walk-through at engine level, on a temporary backing file: the same steps an
 * administrator takes with the devices, narrated, with every claim checked as it is made.
 */
import { createHash } from 'node:crypto';
import { mkdtemp, open, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { check } from '../../src/engine/check.js';
import { Disk, StoreExecutor } from '../../src/engine/executor.js';
import { ResyncScheduler } from '../../src/engine/resync.js';
import { Volume } from '../../src/engine/volume.js';
import { FileStore } from '../../src/store/file-store.js';

const MiB = 1 << 20;
const say = (text: string) => console.log(`demo: ${text}`);
const digest = (data: Uint8Array) => createHash('sha256').update(data).digest('hex').slice(0, 16);

function pattern(seed: number, length: number): Uint8Array {
  const out = new Uint8Array(length);
  let x = seed | 1;
  for (let i = 0; i < length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out[i] = x & 0xff;
  }
  return out;
}

function assert(condition: boolean, message: string): void {
  if (!condition) throw new Error(`demo: check failed: ${message}`);
}

async function main(): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), 'cldd-demo-'));
  const path = join(dir, 'disk.img');
  try {
    const fh = await open(path, 'w');
    await fh.truncate(64 * MiB);
    await fh.close();
    say(`created a 64 MiB backing file ${path}`);

    let store = await FileStore.open(path);
    let volume = await Volume.format(store, { name: 'demo' });
    let disk = new Disk(volume);
    say(`formatted it: master capacity ${volume.capacity / MiB} MiB (${volume.layout.blocks} blocks of ${volume.blockSize} bytes), state ${volume.state}`);

    const before = pattern(1, 8 * MiB);
    await disk.write(0, before);
    await disk.flush();
    say(`wrote 8 MiB of data to the master and flushed (sha256 ${digest(before)})`);

    await volume.enable();
    say(`enabled the slave: snapshot ${volume.epoch}; the data area is now frozen`);

    const after = pattern(2, 4 * MiB);
    await disk.write(2 * MiB, after);
    await disk.flush();
    say(`kept working: overwrote 4 MiB of the master at offset 2 MiB (${volume.map.count} blocks redirected)`);

    const slave = await disk.read(0, 8 * MiB, 'slave');
    assert(digest(slave) === digest(before), 'the slave shows the enable-time image');
    say(`the slave still shows the enable-time image (sha256 ${digest(slave)}): back it up from here`);

    const master = await disk.read(0, 8 * MiB);
    const expected = before.slice();
    expected.set(after, 2 * MiB);
    assert(digest(master) === digest(expected), 'the master shows the new writes');
    say(`the master shows the new data (sha256 ${digest(master)})`);

    await volume.close();
    await store.close();
    say('stopped without disabling (as a crash or a restart would), then reopened the backing file');
    store = await FileStore.open(path);
    volume = await Volume.open(store);
    disk = new Disk(volume);
    assert(volume.state === 'snapshot', 'the snapshot survives a restart');
    assert(digest(await disk.read(0, 8 * MiB, 'slave')) === digest(before), 'the slave image survives a restart');
    say(`state after reopening: ${volume.state}, slave image unchanged`);

    await volume.disable();
    say(`disabled the slave: state ${volume.state}, ${volume.map.count} blocks to merge back`);
    const scheduler = new ResyncScheduler(volume, new StoreExecutor(store), { runBytes: 256 * 1024 });
    const done = scheduler.start();
    await disk.write(3 * MiB, pattern(3, MiB));
    expected.set(pattern(3, MiB), 3 * MiB);
    say('wrote 1 MiB to the master while the resync runs');
    await done;
    const p = scheduler.progress();
    say(`resync finished: ${p.blocksMerged} blocks merged, state ${volume.state}`);
    assert(volume.state === 'plain', 'resync ends in plain');
    assert(digest(await disk.read(0, 8 * MiB)) === digest(expected), 'the master holds every write after the resync');
    say('the master holds every write');

    await volume.close();
    const report = await check(store);
    await store.close();
    assert(report.clean, 'check finds the store clean');
    say(`offline check: clean, ${report.findings.length} findings`);
    say('the kernel devices (/dev/ublkbN) and the cldd command come with the device and CLI issues; this walk-through ran the same engine on a file');
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

main().catch((err) => {
  console.error(err instanceof Error ? err.message : String(err));
  process.exit(1);
});
