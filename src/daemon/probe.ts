import { execFile } from 'node:child_process';
import type { BlockStore } from '../store/block-store.js';

const PROBE_BYTES = 1 << 20;

export interface ForeignData {
  /** What was found, for the refusal message: "an ext4 filesystem", "a gpt partition table", ... */
  description: string;
}

/**
 * Looks for data that formatting would destroy: any signature blkid knows (filesystems,
 * partition tables, RAID and LVM members, swap, LUKS) and, failing that, any non-zero byte in
 * the first MiB or the last MiB (where backup GPT headers and some RAID superblocks live).
 * blkid (util-linux, essential on Debian) knows far more formats than cldd should hand-code.
 */
export async function probeForeignData(path: string, store: BlockStore): Promise<ForeignData | null> {
  const found = await blkidProbe(path);
  if (found) return found;
  for (const offset of [0, Math.max(0, store.size - PROBE_BYTES)]) {
    const length = Math.min(PROBE_BYTES, store.size - offset);
    if (length <= 0) continue;
    const buf = new Uint8Array(length);
    await store.read(buf, offset);
    const at = buf.findIndex((b) => b !== 0);
    if (at >= 0) return { description: `non-zero data (at byte ${offset + at})` };
  }
  return null;
}

async function blkidProbe(path: string): Promise<ForeignData | null> {
  const result = await new Promise<{ code: number; stdout: string; stderr: string }>((resolve) => {
    execFile('blkid', ['-p', '-o', 'export', path], (err, stdout, stderr) => {
      const code = err ? (typeof err.code === 'number' ? err.code : -1) : 0;
      resolve({ code, stdout, stderr });
    });
  });
  if (result.code === 2) return null; // nothing found
  if (result.code === -1) throw new Error(`blkid could not run: ${result.stderr.trim() || 'not installed'}`);
  const fields = Object.fromEntries(
    result.stdout
      .split('\n')
      .filter((l) => l.includes('='))
      .map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)]),
  );
  if (fields.PTTYPE) return { description: `a ${fields.PTTYPE} partition table` };
  if (fields.TYPE) return { description: `${/^[aeiou]/i.test(fields.TYPE) ? 'an' : 'a'} ${fields.TYPE} signature${fields.LABEL ? ` (label "${fields.LABEL}")` : ''}` };
  if (result.code === 0) return { description: 'a signature blkid recognises' };
  // blkid reports ambivalent results (several signatures) with exit 8.
  return { description: `signatures blkid cannot tell apart (${result.stderr.trim() || `exit ${result.code}`})` };
}
