import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { runWithin } from '../deadline.js';
import { CldError } from '../errors.js';
import { metadataPages, type Layout } from '../format/format.js';
import type { BlockStore } from '../io/block-store.js';

const PROBE_BYTES = 1 << 20;

export interface ForeignData {
  /** What was found, for the refusal message: "an ext4 signature", "a gpt partition table", ... */
  description: string;
}

/** A signature libblkid recognises: a filesystem, swap, RAID or LVM member, LUKS, a partition table. */
export interface Signature {
  /** libblkid's name for it: ext4, swap, gpt, dos, PMBR, linux_raid_member, crypto_LUKS, ... */
  type: string;
  /** Where its magic is, in bytes from the start of the store, and how long the magic is. */
  offset: number;
  length: number;
  label: string | null;
  partitionTable: boolean;
}

/**
 * Every signature libblkid finds, with where its magic lies, as `wipefs` lists them (without
 * --all it only reads). libblkid knows far more formats than cldd should hand-code, but not
 * cldd's own: a cldd store with nothing else on it lists nothing.
 */
export async function listSignatures(path: string): Promise<Signature[]> {
  const { stdout } = await runTool('wipefs', ['--json', '--output', 'OFFSET,LENGTH,TYPE,LABEL,USAGE', path]);
  // An empty device prints nothing at all with some versions.
  if (!stdout.trim()) return [];
  const listed = (JSON.parse(stdout) as { signatures?: { offset: string; length: number | string; type: string; label: string | null; usage: string | null }[] })
    .signatures ?? [];
  return listed.map((s) => ({
    type: s.type,
    offset: Number(s.offset),
    length: Number(s.length),
    label: s.label || null,
    partitionTable: s.usage === 'partition-table',
  }));
}

/** "an ext4 signature (label "home")", "a gpt partition table". */
export function describeSignature(s: Signature): string {
  const article = /^[aeiou]/i.test(s.type) ? 'an' : 'a';
  if (s.partitionTable) return `${article} ${s.type} partition table`;
  return `${article} ${s.type} signature${s.label ? ` (label "${s.label}")` : ''}`;
}

/**
 * Looks for data that formatting would destroy, on a store that holds no cldd superblock: any
 * of the signatures listSignatures found and, failing that, any non-zero byte in the first MiB
 * or the last MiB (where backup GPT headers and some RAID superblocks live).
 */
export async function probeForeignData(store: BlockStore, signatures: Signature[]): Promise<ForeignData | null> {
  // A protective MBR says less than the GPT it protects.
  const first = signatures.find((s) => s.type !== 'PMBR') ?? signatures[0];
  if (first) return { description: describeSignature(first) };
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

export interface ForeignSignature {
  signature: Signature;
  /** The part of the cldd store it overwrote: "the superblocks", "the map", ... */
  area: string;
}

/**
 * The signatures on a cldd store that were written over it by something else. libblkid does not
 * know cldd, so the offset decides: the data and change areas hold whatever the pair's users
 * wrote (a filesystem on the master may show through, e.g. a RAID superblock at the end of a
 * redirected block), so a signature there is the pair's own data; anywhere else is cldd's
 * metadata or space cldd never writes, where only another program can have put one. A swap
 * signature, for instance, ends at byte 4096, inside superblock copy 0's block, whose bytes
 * after the first 512 cldd only ever writes as zeros.
 */
export function signaturesOverStore(layout: Layout, signatures: Signature[]): ForeignSignature[] {
  const areaBytes = layout.blocks * layout.blockSize;
  const inside = (offset: number, start: number) => offset >= start && offset < start + areaBytes;
  const mapEnd = layout.mapOffset + 2 * metadataPages(layout) * layout.blockSize;
  const area = (offset: number): string | null => {
    if (inside(offset, layout.dataOffset) || inside(offset, layout.changeOffset)) return null;
    if (offset < layout.mapOffset) return 'the superblocks';
    if (offset < mapEnd) return 'the redirect map';
    if (offset < layout.dataOffset) return 'the space before the data area';
    if (offset < layout.changeOffset) return 'the space between the data and change areas';
    return 'the space after the change area';
  };
  return signatures.flatMap((signature) => {
    const where = area(signature.offset);
    return where ? [{ signature, area: where }] : [];
  });
}

/** "a swap signature at byte 4086, in the superblocks" */
export function describeForeignSignature(f: ForeignSignature): string {
  return `${describeSignature(f.signature)} at byte ${f.signature.offset}, in ${f.area}`;
}

/**
 * Erases the magic of each signature, as `wipefs --all` does, so that nothing another tool would
 * take for a filesystem, RAID member or partition table survives a format. Written through the
 * store (which holds a block device exclusively). Only for a store about to be formatted: every
 * check has passed and destroying its contents was asked for.
 */
export async function eraseSignatures(store: BlockStore, signatures: Signature[]): Promise<void> {
  for (const s of signatures) {
    const length = Math.min(s.length, store.size - s.offset);
    if (length > 0) await store.write(new Uint8Array(length), s.offset);
  }
}

/** util-linux's tools live in /usr/sbin, which a non-root user's PATH often lacks. */
function findTool(name: string): string {
  const dirs = [...(process.env.PATH ?? '').split(':').filter(Boolean), '/usr/sbin', '/sbin'];
  for (const dir of dirs) {
    const candidate = join(dir, name);
    if (existsSync(candidate)) return candidate;
  }
  throw new CldError('ENOENT', `${name} (util-linux) is not installed: cldd needs it to recognise other data on a backing store`);
}

/**
 * wipefs reads a few blocks: a store that has not answered after this long will not, and the
 * command must not hang on it.
 */
const TOOL_BOUND_MS = 30_000;

async function runTool(name: string, args: string[]): Promise<{ stdout: string }> {
  const stdout = await runWithin(findTool(name), args, TOOL_BOUND_MS, `${name} ${args.slice(0, -1).join(' ')}`, { ...process.env, LC_ALL: 'C' });
  return { stdout };
}
