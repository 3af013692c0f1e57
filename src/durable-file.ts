/**
 * Files that must survive a crash whole: the pair configuration and the systemd unit in /etc,
 * backup records. Replaced, never rewritten in place: written to a temporary file beside the
 * target, synced, renamed over it, and the directory synced. A write cut short (a full disk) or
 * a process killed mid-way then leaves the old file, not an empty or torn one: a torn
 * /etc/cldd/NAME.conf can still parse (`BACKING=/dev/disk/by-id/ata-X` cut before `-part1` names
 * the whole disk), and an empty cldd@.service masks every pair at the next boot.
 */
import { mkdir, open, rename, rm } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { ioError } from './errors.js';

/** Replaces `path` with `content`; on disk, under its name, when this returns. Errors name `what` and the path. */
export async function replaceFileDurably(path: string, content: string, mode: number, what: string): Promise<void> {
  const temp = join(dirname(path), `.${basename(path)}.${process.pid}.tmp`);
  try {
    await mkdir(dirname(path), { recursive: true, mode: 0o755 });
    const fh = await open(temp, 'w', mode);
    try {
      await fh.writeFile(content);
      await fh.sync();
    } finally {
      await fh.close();
    }
    await rename(temp, path);
    const dir = await open(dirname(path), 'r');
    try {
      await dir.sync();
    } finally {
      await dir.close();
    }
  } catch (err) {
    // Best effort: what made the write fail may keep it from going too.
    await rm(temp, { force: true }).catch(() => {});
    throw ioError(`write ${what} ${path}`, err);
  }
}
