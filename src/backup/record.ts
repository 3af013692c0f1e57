/**
 * What a backup TARGET holds, recorded beside it: for a file `TARGET.cldd-backup`, for a block
 * device a file named after the device's path under CLDD_BACKUP_RECORD_DIR (default
 * /var/lib/cldd/backups: /dev is a tmpfs, and a record lost at reboot would make every backup
 * full). JSON, replaced atomically (temporary file, fsync, rename, fsync of the directory), and
 * written only after the data it describes is durable: a record saying `complete` is never
 * ahead of the image.
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { replaceFileDurably } from '../durable-file.js';
import { ioError } from '../errors.js';

export const RECORD_FORMAT = 'cldd-backup';
export const RECORD_VERSION = 1;
export const DEFAULT_RECORD_DIR = '/var/lib/cldd/backups';

export interface BackupRecord {
  format: typeof RECORD_FORMAT;
  version: typeof RECORD_VERSION;
  /** The store uuid of the pair (32 hex digits) and its name when written. */
  uuid: string;
  pair: string;
  /** The snapshot the image is (or, while incomplete, is becoming). */
  snapshot: number;
  /** The data of `snapshot` is all in TARGET and durable. False from the first write on. */
  complete: boolean;
  /** Bytes of the image (the master's capacity). */
  size: number;
  /** SHA-256 sum of the image, per 64 KiB region (image-copy.ts, imageDigest); '' while incomplete. */
  digest: string;
  /** This backup enabled the snapshot, so the run that completes it disables it again. */
  enabledByBackup: boolean;
  updatedAt: string;
}

export function recordPath(target: string, isBlockDevice: boolean): string {
  if (!isBlockDevice) return `${target}.cldd-backup`;
  const dir = process.env.CLDD_BACKUP_RECORD_DIR || DEFAULT_RECORD_DIR;
  return join(dir, `${target.replace(/^\//, '').replace(/\//g, '_')}.cldd-backup`);
}

export type RecordRead = { kind: 'none' } | { kind: 'ok'; record: BackupRecord } | { kind: 'unreadable'; reason: string };

const isHex = (s: unknown, n: number) => typeof s === 'string' && s.length === n && /^[0-9a-f]*$/.test(s);
const isCount = (n: unknown) => typeof n === 'number' && Number.isSafeInteger(n) && n >= 0;

export async function readRecord(path: string): Promise<RecordRead> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    if ((err as { code?: string }).code === 'ENOENT') return { kind: 'none' };
    throw ioError(`read ${path}`, err);
  }
  let r: Partial<BackupRecord>;
  try {
    r = JSON.parse(text) as Partial<BackupRecord>;
  } catch {
    return { kind: 'unreadable', reason: 'not JSON' };
  }
  if (typeof r !== 'object' || r === null || r.format !== RECORD_FORMAT) return { kind: 'unreadable', reason: 'not a cldd backup record' };
  if (r.version !== RECORD_VERSION) return { kind: 'unreadable', reason: `record version ${String(r.version)}` };
  const ok =
    isHex(r.uuid, 32) &&
    typeof r.pair === 'string' &&
    isCount(r.snapshot) &&
    typeof r.complete === 'boolean' &&
    isCount(r.size) &&
    (r.digest === '' || isHex(r.digest, 64)) &&
    (r.complete ? r.digest !== '' : true) &&
    typeof r.enabledByBackup === 'boolean';
  if (!ok) return { kind: 'unreadable', reason: 'a field is missing or malformed' };
  return { kind: 'ok', record: r as BackupRecord };
}

/** Replaces the record durably: it is on disk, under its name, when this returns. */
export async function writeRecord(path: string, record: Omit<BackupRecord, 'format' | 'version' | 'updatedAt'>): Promise<void> {
  const full: BackupRecord = { format: RECORD_FORMAT, version: RECORD_VERSION, ...record, updatedAt: new Date().toISOString() };
  // A block device's records live in their own directory (a file's beside it, which exists).
  await replaceFileDurably(path, `${JSON.stringify(full, null, 2)}\n`, 0o644, 'the backup record');
}
