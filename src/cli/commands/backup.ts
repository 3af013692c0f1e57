import { open, readFile, realpath, stat } from 'node:fs/promises';
import { basename } from 'node:path';
import type { Argv, CommandModule } from 'yargs';
import { copyImage, verifyImage, type Extent } from '../../backup/image-copy.js';
import { decide, type Decision, type PairFacts, type TargetFacts } from '../../backup/decide.js';
import { readRecord, recordPath, writeRecord } from '../../backup/record.js';
import type { DaemonClient } from '../../protocol/client.js';
import { usersOf } from '../../system/device-users.js';
import type { PairStatus } from '../../protocol/methods.js';
import { listSignatures } from '../probe.js';
import { CldError, ioError } from '../../errors.js';
import { text } from '../../printable.js';
import { parsePath, parseSize } from '../options.js';
import { formatBytes, printJson } from '../output.js';
import { withPair } from '../pairs.js';
import { copyProgress } from '../progress.js';
import { requireRoot } from '../root.js';
import { fetchChanges } from './changes.js';

interface Args {
  pair: string;
  target: string;
  full: boolean;
  verify: boolean;
  freeze?: string;
  rate?: string;
  json: boolean;
}

export interface BackupSummary {
  pair: string;
  target: string;
  snapshot: number;
  /** full, incremental (since the snapshot TARGET held) or current (it held this one already). */
  kind: 'full' | 'incremental' | 'current';
  since: number | null;
  why: string | null;
  bytesCopied: number;
  bytesWritten: number;
  extents: number;
  seconds: number;
  /** Share of the image not copied (0..1). */
  skipped: number;
  verified: boolean;
  digest: string;
}

/** What the TARGET path is and holds; nothing is opened for writing. */
async function targetFacts(path: string): Promise<TargetFacts> {
  let st;
  try {
    st = await stat(path);
  } catch (err) {
    if ((err as { code?: string }).code !== 'ENOENT') throw ioError(`stat ${path}`, err);
    return { path, exists: false, isBlockDevice: false, size: 0, blank: true, record: await readRecord(recordPath(path, false)) };
  }
  if (!st.isFile() && !st.isBlockDevice()) throw new CldError('EINVAL', `${path} is neither a regular file nor a block device`);
  const isBlockDevice = st.isBlockDevice();
  let size = st.size;
  let blank = size === 0;
  if (isBlockDevice) {
    size = await deviceBytes(path);
    const fh = await open(path, 'r');
    try {
      const head = Buffer.alloc(Math.min(size, 1 << 20));
      const tail = Buffer.alloc(head.length);
      await fh.read(head, 0, head.length, 0);
      await fh.read(tail, 0, tail.length, size - tail.length);
      blank = head.every((b) => b === 0) && tail.every((b) => b === 0) && (await listSignatures(path)).length === 0;
    } finally {
      await fh.close();
    }
  }
  return { path, exists: true, isBlockDevice, size, blank, record: await readRecord(recordPath(path, isBlockDevice)) };
}

/** A block device's size in bytes, from sysfs (stat says 0 for a device). */
async function deviceBytes(path: string): Promise<number> {
  const name = basename(await realpath(path));
  try {
    return Number((await readFile(`/sys/class/block/${name}/size`, 'utf8')).trim()) * 512;
  } catch (err) {
    throw ioError(`read the size of ${path} (/sys/class/block/${name}/size)`, err);
  }
}

/** TARGET must not be the pair's own backing store or devices. */
async function refuseOwnDevices(target: string, s: PairStatus): Promise<void> {
  let real: string;
  try {
    real = await realpath(target);
  } catch {
    return; // does not exist yet
  }
  for (const own of [s.backing, s.master, s.slave]) {
    if (!own) continue;
    const theirs = await realpath(own).catch(() => own);
    if (theirs === real) throw new CldError('EINVAL', `${target} is ${own}, which belongs to the pair "${s.name}": a backup goes elsewhere`);
  }
}

export const backupCommand: CommandModule<object, Args> = {
  command: 'backup <pair> <target>',
  describe: "Write the slave's image to TARGET (a file or a block device): only what changed since the snapshot TARGET holds, else everything",
  builder: (y: Argv) =>
    y
      .positional('pair', { type: 'string', demandOption: true, describe: 'pair name or one of its devices' })
      .positional('target', { type: 'string', demandOption: true, describe: 'image file (created sparse) or block device' })
      .option('full', { type: 'boolean', default: false, describe: 'copy everything, overwriting whatever TARGET holds' })
      .option('verify', { type: 'boolean', default: false, describe: 'read TARGET and the slave back in full and compare them' })
      .option('freeze', { type: 'string', describe: 'mountpoint to freeze when the backup takes the snapshot (default: where the master is mounted)' })
      .option('rate', { type: 'string', describe: 'copy at most this many bytes per second (e.g. 50M), to spare the disk the users work on' })
      .option('json', { type: 'boolean', default: false }) as unknown as Argv<Args>,
  handler: async (args) => {
    const target = parsePath('TARGET', args.target);
    const freeze = typeof args.freeze === 'string' ? parsePath('--freeze', args.freeze) : '';
    const rate = args.rate === undefined ? null : parseSize('--rate', args.rate);
    requireRoot('cldd backup');
    const summary = await withPair(args.pair, (client, name) => backup(client, name, target, { full: args.full, verify: args.verify, freeze, rate }));
    if (args.json) return printJson(summary);
    const how =
      summary.kind === 'current'
        ? `it already held snapshot ${summary.snapshot}: nothing to copy`
        : `${summary.kind === 'full' ? 'full copy' : `incremental since snapshot ${summary.since}`}: ${formatBytes(summary.bytesCopied)} copied in ${summary.extents} extents, ${summary.seconds.toFixed(1)} s, ${(100 * summary.skipped).toFixed(1)}% of the disk skipped`;
    console.log(text`${summary.pair}: snapshot ${summary.snapshot} -> ${summary.target}: ${how}${summary.verified ? '; verified' : ''}`);
  },
};

export async function backup(
  client: DaemonClient,
  name: string,
  target: string,
  options: { full: boolean; verify: boolean; freeze: string; rate?: number | null },
): Promise<BackupSummary> {
  let status = await client.request('status');
  if (!status.uuid) throw new CldError('EPROTO', `the daemon of "${name}" does not say its store's uuid: restart it with this cldd`);
  if (!status.master) throw new CldError('ENODEV', `the pair "${name}" has no devices (its daemon runs without them): there is no slave to back up`);
  await refuseOwnDevices(target, status);
  const facts = await targetFacts(target);
  if (facts.isBlockDevice) {
    const users = await usersOf(target);
    if (users.mounts.length) throw new CldError('EBUSY', `${target} is mounted on ${users.mounts.join(', ')}: refusing to write under a filesystem`);
  }
  const pair = { name, uuid: status.uuid, capacity: status.capacity };
  let enabledHere = false;
  if (status.state === 'resync') {
    throw new CldError('CLDD_STATE', `a resync is still running (${status.redirected} blocks left): wait for it (cldd status shows it), then retry`);
  }
  if (status.state === 'plain') {
    // Every refusal comes before the snapshot is taken: a refused backup changes nothing.
    const decision = decide(facts, { ...pair, snapshot: status.snapshot + 1 }, options.full);
    if (decision.kind === 'incremental' && status.tracking && decision.base.snapshot !== status.tracking.since) {
      throw tooOld(target, decision.base.snapshot, status.tracking.since);
    }
    const enabled = await client.request('enable', { freeze: options.freeze, noFreeze: false, wait: false });
    if (!enabled.frozen) process.stderr.write(text`cldd backup: took snapshot ${enabled.epoch} (no filesystem frozen)\n`);
    else process.stderr.write(text`cldd backup: took snapshot ${enabled.epoch}; ${enabled.frozen} was frozen for ${(enabled.frozenMs ?? 0).toFixed(1)} ms\n`);
    enabledHere = true;
    status = await client.request('status');
  } else if (options.freeze) {
    process.stderr.write(text`cldd backup: snapshot ${status.snapshot} is already enabled: nothing to freeze, ${options.freeze} left as it is\n`);
  }
  const snapshot = status.snapshot;
  let decision: Decision | null = null;
  // A run killed after it took the snapshot left it enabled; the run that finishes its work
  // disables it, as that one would have.
  let owns = enabledHere;
  try {
    if (!status.slave) throw new CldError('ENODEV', `the pair "${name}" has no slave device (the daemon runs without devices)`);
    decision = decide(facts, { ...pair, snapshot }, options.full);
    const r = facts.record;
    if (r.kind === 'ok' && !r.record.complete && r.record.snapshot === snapshot && r.record.enabledByBackup && r.record.uuid === pair.uuid) owns = true;
    return await copy(client, { ...pair, snapshot }, target, facts, status.slave, decision, owns, options.verify, options.rate ?? null);
  } finally {
    if (owns) {
      const d = await client.request('disable');
      process.stderr.write(text`cldd backup: disabled snapshot ${snapshot}; ${d.blocks} blocks to merge back\n`);
    }
  }
}

function tooOld(target: string, held: number, kept: number): CldError {
  return new CldError(
    'CLDD_STATE',
    `${target} holds snapshot ${held}, but this pair keeps only the changes since snapshot ${kept}: an incremental copy would miss data; run with --full to copy everything`,
  );
}

async function copy(
  client: DaemonClient,
  pair: PairFacts,
  target: string,
  facts: TargetFacts,
  slave: string,
  decision: Decision,
  owns: boolean,
  verify: boolean,
  rate: number | null,
): Promise<BackupSummary> {
  const { name, uuid, capacity, snapshot } = pair;
  const record = recordPath(target, facts.isBlockDevice);
  const started = performance.now();
  let extents: Extent[] | null = null;
  let kind: BackupSummary['kind'] = decision.kind;
  let why: string | null = decision.kind === 'full' ? decision.why : null;
  const since = decision.kind === 'full' ? null : decision.base.snapshot;
  if (decision.kind === 'current') {
    if (verify) await verifyImage({ source: slave, target, size: capacity, digest: decision.base.digest });
    return summary(0, 0, 0, decision.base.digest);
  }
  if (decision.kind === 'incremental') {
    const changes = await fetchChanges(client, decision.base.snapshot);
    if (changes.uuid !== uuid || changes.snapshot !== snapshot) throw new CldError('CLDD_STATE', `the pair "${name}" changed snapshot during the backup`);
    if (changes.available) extents = changes.extents;
    else if (changes.reason?.includes('no changed-block tracking')) {
      kind = 'full';
      why = changes.reason;
      process.stderr.write(text`cldd backup: ${changes.reason}: copying everything\n`);
    } else throw tooOld(target, decision.base.snapshot, snapshot - 1);
  }
  // From here TARGET changes: the record says so first, and says complete only once it is durable.
  await writeRecord(record, { uuid, pair: name, snapshot, complete: false, size: capacity, digest: '', enabledByBackup: owns });
  const bar = copyProgress('backup');
  let result;
  try {
    result = await copyImage({
      source: slave,
      target,
      targetIsBlockDevice: facts.isBlockDevice,
      size: capacity,
      extents,
      baseDigest: decision.kind === 'incremental' ? decision.base.digest : undefined,
      rate,
      onProgress: (p) => bar.update(p.done, p.total),
    });
  } finally {
    bar.done();
  }
  if (verify) {
    const check = copyProgress('verify');
    try {
      await verifyImage({ source: slave, target, size: capacity, digest: result.digest, onProgress: (p) => check.update(p.done, p.total) });
    } finally {
      check.done();
    }
  }
  await writeRecord(record, { uuid, pair: name, snapshot, complete: true, size: capacity, digest: result.digest, enabledByBackup: owns });
  return summary(result.bytesCopied, result.bytesWritten, result.extents, result.digest);

  function summary(bytesCopied: number, bytesWritten: number, count: number, digest: string): BackupSummary {
    return {
      pair: name,
      target,
      snapshot,
      kind,
      since: kind === 'full' ? null : since,
      why,
      bytesCopied,
      bytesWritten,
      extents: count,
      seconds: (performance.now() - started) / 1000,
      skipped: capacity > 0 ? 1 - bytesCopied / capacity : 1,
      verified: verify,
      digest,
    };
  }
}

