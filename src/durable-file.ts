/**
 * Files that must survive a crash whole: the pair configuration and the systemd unit in /etc,
 * backup records. Replaced, never rewritten in place: written to a temporary file beside the
 * target, synced, renamed over it, and the directory synced. A write cut short (a full disk) or
 * a process killed mid-way then leaves the old file, not an empty or torn one: a torn
 * /etc/cldd/NAME.conf can still parse (`BACKING=/dev/disk/by-id/ata-X` cut before `-part1` names
 * the whole disk), and an empty cldd@.service masks every pair at the next boot.
 */
import { mkdir, open, readdir, rename, rm } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { ioError } from './errors.js';

/**
 * Replaces `path` with `content`; on disk, under its name, when this returns. Errors name `what` and the path.
 * The temporary file is named after the process (two commands may replace the same file at once);
 * one a killed process left is removed by the next replacement.
 */
export async function replaceFileDurably(path: string, content: string, mode: number, what: string): Promise<void> {
  const temp = join(dirname(path), `.${basename(path)}.${process.pid}.tmp`);
  try {
    await mkdir(dirname(path), { recursive: true, mode: 0o755 });
    await removeLeftovers(path);
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

/** Removes the temporary files of `path` that processes no longer running left (killed mid-way). */
async function removeLeftovers(path: string): Promise<void> {
  const prefix = `.${basename(path)}.`;
  for (const entry of await readdir(dirname(path))) {
    const pid = entry.startsWith(prefix) && entry.endsWith('.tmp') ? entry.slice(prefix.length, -'.tmp'.length) : '';
    if (!/^[1-9][0-9]{0,9}$/.test(pid) || Number(pid) === process.pid || running(Number(pid))) continue;
    // Best effort: another command may remove it first.
    await rm(join(dirname(path), entry), { force: true }).catch(() => {});
  }
}

function running(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    // EPERM: it runs, as another user.
    return (err as NodeJS.ErrnoException).code !== 'ESRCH';
  }
}
