/**
 * What `cldd backup` does with a TARGET, from what it holds (its record, whether it is empty)
 * and the pair's snapshot: a full copy, the changed extents since the snapshot it holds, nothing
 * (it holds this snapshot already), or a refusal. Never overwrites data it cannot name as this
 * pair's backup unless asked with --full.
 */
import { CldError } from '../errors.js';
import type { BackupRecord, RecordRead } from './record.js';

export interface TargetFacts {
  path: string;
  exists: boolean;
  isBlockDevice: boolean;
  /** Bytes (a file's size, a device's capacity). */
  size: number;
  /** A new or empty file; a block device with no signature and zeros at both ends. */
  blank: boolean;
  record: RecordRead;
}

export interface PairFacts {
  name: string;
  uuid: string;
  /** The enabled snapshot the backup copies. */
  snapshot: number;
  capacity: number;
}

export type Decision =
  | { kind: 'full'; why: string }
  | { kind: 'incremental'; base: BackupRecord }
  | { kind: 'current'; base: BackupRecord };

const overwrite = 'run with --full to overwrite it';

export function decide(target: TargetFacts, pair: PairFacts, full: boolean): Decision {
  if (target.isBlockDevice && target.size < pair.capacity) {
    throw new CldError('ENOSPC', `${target.path} has ${target.size} bytes, the slave ${pair.capacity}: it cannot hold the image`);
  }
  const r = target.record;
  if (full) return { kind: 'full', why: 'asked with --full' };
  if (r.kind === 'unreadable') {
    throw new CldError('CLDD_CORRUPT', `the backup record of ${target.path} cannot be read (${r.reason}): refusing to overwrite the target; ${overwrite}`);
  }
  if (r.kind === 'none') {
    if (!target.exists || target.blank) return { kind: 'full', why: 'a new target' };
    throw new CldError('CLDD_FOREIGN', `${target.path} holds data that is not a cldd backup (no record beside it): refusing to overwrite it; ${overwrite}`);
  }
  const b = r.record;
  if (b.uuid !== pair.uuid) {
    throw new CldError('CLDD_FOREIGN', `${target.path} is a backup of another pair ("${b.pair}", store ${b.uuid}), not of "${pair.name}": refusing to overwrite it; ${overwrite}`);
  }
  const size = target.isBlockDevice ? b.size : target.size;
  // An interrupted copy leaves a file as long as the furthest write it made (a sparse copy sets
  // the size only at the end), down to 0 bytes when it was stopped before its first write.
  const interrupted = !b.complete && size <= b.size;
  if (b.size !== pair.capacity || (size !== b.size && !interrupted)) {
    throw new CldError('CLDD_CORRUPT', `${target.path} holds ${size} bytes and its record says ${b.size}, the slave has ${pair.capacity}: it is not the image it was; ${overwrite}`);
  }
  if (!b.complete) return { kind: 'full', why: `the backup of snapshot ${b.snapshot} into it was interrupted, so it is redone in full` };
  if (b.snapshot > pair.snapshot) {
    throw new CldError('CLDD_STATE', `${target.path} holds snapshot ${b.snapshot}, newer than the enabled snapshot ${pair.snapshot}: refusing to go back; ${overwrite}`);
  }
  if (b.snapshot === pair.snapshot) return { kind: 'current', base: b };
  return { kind: 'incremental', base: b };
}
