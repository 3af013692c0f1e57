import { open, rm, stat } from 'node:fs/promises';
import { CldError, codeOf } from '../errors.js';
import { MAX_BLOCK_SIZE, SUPERBLOCK_COPIES, computeLayout, type Superblock } from '../format/format.js';
import { Volume } from '../engine/volume.js';
import { readSuperblocks } from '../format/recovery.js';
import {
  type Signature,
  describeForeignSignature,
  eraseSignatures,
  listSignatures,
  probeForeignData,
  signaturesOverStore,
} from './probe.js';
import { FileStore } from '../io/file-store.js';
import type { BlockStore } from '../io/block-store.js';
import { DEFAULT_BLOCK_SIZE, DEVICE_BLOCK_LIMIT, MAX_DEVICE_BLOCK_SIZE } from './options.js';

export interface PrepareOptions {
  /** Create a regular file of this many bytes when the backing store does not exist. */
  size?: number;
  /** Already checked by parseBlockSize; undefined means the default (or the store's own). */
  blockSize?: number;
  name: string;
  force: boolean;
}

export interface Prepared {
  /** 'created' (new file, formatted), 'formatted' (existing, now formatted) or 'existing' (a cldd store). */
  how: 'created' | 'formatted' | 'existing';
  state: string;
  capacity: number;
}

/**
 * Makes BACKING a cldd store, or finds that it is one. Refusals change nothing on disk: every
 * check runs before the first write, and a file this call created is removed again.
 * A cldd store is reattached, never formatted again, unless something else was written over it
 * (a signature libblkid knows outside the pair's data, such as mkswap's) or its blocks are too
 * large for a block device here; then, as with any other data, only --force formats it.
 */
export async function prepareBacking(path: string, options: PrepareOptions): Promise<Prepared> {
  const blockSize = options.blockSize ?? DEFAULT_BLOCK_SIZE;
  const exists = await stat(path).then(
    () => true,
    (err) => {
      if ((err as { code?: string }).code === 'ENOENT') return false;
      throw err;
    },
  );
  let created = false;
  if (!exists) {
    if (options.size === undefined) throw new CldError('ENOENT', `${path} does not exist (give --size to create it)`);
    computeLayout(options.size, blockSize); // too small: refused before the file exists
    const fh = await open(path, 'wx', 0o600).catch((err) => {
      throw new CldError(codeOf(err), `cannot create ${path}: ${(err as Error).message}`);
    });
    try {
      await fh.truncate(options.size);
    } catch (err) {
      // Larger than the file system takes (EFBIG): the refusal leaves no empty file behind.
      await fh.close();
      await rm(path, { force: true });
      throw new CldError(codeOf(err), `cannot make ${path} ${options.size} bytes long: ${(err as Error).message}`);
    }
    await fh.close();
    created = true;
  } else if (options.size !== undefined) {
    throw new CldError('EEXIST', `${path} already exists; --size only creates a new file`);
  }

  try {
    const store = await FileStore.open(path);
    try {
      const found = created ? { sb: null, signatures: [] } : await examine(path, store, options);
      if (found.sb) {
        const { layout } = found.sb;
        return { how: 'existing', state: found.sb.state, capacity: layout.blocks * layout.blockSize };
      }
      // Formatting: a new file, an empty store, or --force. The last checks write nothing either.
      computeLayout(store.size, blockSize);
      if (!created) await wipeForFormat(store, found.signatures);
      const volume = await Volume.format(store, { blockSize, name: options.name });
      const result: Prepared = { how: created ? 'created' : 'formatted', state: volume.state, capacity: volume.capacity };
      await volume.close();
      return result;
    } finally {
      await store.close();
    }
  } catch (err) {
    if (created) await rm(path, { force: true });
    throw err;
  }
}

const FORMAT_ANEW = 'cldd add --force formats it anew, destroying its contents';

/**
 * Decides, without writing, what an existing store is: a cldd store to reattach (its superblock
 * returned), or something to format (refused here unless --force). `signatures` are the ones a
 * format must erase.
 */
async function examine(path: string, store: BlockStore, options: PrepareOptions): Promise<{ sb: Superblock | null; signatures: Signature[] }> {
  const signatures = await listSignatures(path);
  let sb: Superblock;
  try {
    ({ sb } = await readSuperblocks(store));
  } catch (err) {
    const code = (err as CldError).code;
    if (code === 'CLDD_CORRUPT') {
      if (!options.force) throw new CldError('CLDD_CORRUPT', `${(err as Error).message}; see cldd check ${path}; ${FORMAT_ANEW}`);
      return { sb: null, signatures };
    }
    if (code !== 'CLDD_FOREIGN') throw err;
    if (!options.force) {
      const foreign = await probeForeignData(store, signatures);
      if (foreign) throw new CldError('CLDD_FOREIGN', `${path} holds ${foreign.description}; cldd add --force formats it, destroying that data`);
    }
    return { sb: null, signatures };
  }
  const refusal = attachRefusal(path, sb, signatures);
  if (refusal) {
    if (!options.force) throw new CldError(refusal.code, `${refusal.message}; ${FORMAT_ANEW}`);
    return { sb: null, signatures };
  }
  const storeBlockSize = sb.layout.blockSize;
  if (options.blockSize !== undefined && options.blockSize !== storeBlockSize) {
    throw new CldError('EINVAL', `${path} is a cldd store with ${storeBlockSize}-byte blocks, not ${options.blockSize}`);
  }
  return { sb, signatures };
}

/**
 * Why a valid cldd store must not be attached as it is, or null: something written over it
 * since (mkswap, mkfs, ...: a signature outside the pair's data wins over the cldd superblock),
 * or blocks too large for a block device here.
 */
function attachRefusal(path: string, sb: Superblock, signatures: Signature[]): CldError | null {
  const over = signaturesOverStore(sb.layout, signatures);
  if (over.length > 0) {
    return new CldError('CLDD_FOREIGN', `${path} is a cldd store with ${describeForeignSignature(over[0])}: another program wrote over it`);
  }
  if (sb.layout.blockSize > MAX_DEVICE_BLOCK_SIZE) {
    return new CldError('EINVAL', `${path} is a cldd store with ${sb.layout.blockSize}-byte blocks, which cannot be attached: ${DEVICE_BLOCK_LIMIT}`);
  }
  return null;
}

/**
 * What the daemon checks before it opens a store (systemd starts it without cldd add): the same
 * refusals as cldd add without --force, before the open's recovery writes anything. A store
 * that is not a valid cldd store is left to the open, which refuses it.
 */
export async function refuseUnattachable(path: string): Promise<void> {
  const store = await FileStore.open(path, { readOnly: true });
  let sb: Superblock;
  try {
    ({ sb } = await readSuperblocks(store));
  } catch {
    return;
  } finally {
    await store.close();
  }
  const refusal = attachRefusal(path, sb, await listSignatures(path));
  if (refusal) throw new CldError(refusal.code, `${refusal.message}; ${FORMAT_ANEW}`);
}

/**
 * Before a format over old contents: erase every signature libblkid sees, so that nothing left
 * over (a RAID superblock at the end, say) makes the new store look foreign, and zero the first
 * 2 x 64 KiB, where an older cldd store's superblock copy 1 lies for any block size, so that a
 * damaged copy 0 can never bring back a store formatted before.
 */
async function wipeForFormat(store: BlockStore, signatures: Signature[]): Promise<void> {
  await eraseSignatures(store, signatures);
  await store.write(new Uint8Array(Math.min(store.size, SUPERBLOCK_COPIES * MAX_BLOCK_SIZE)), 0);
  await store.flush();
}

/** A pair name from a backing path: /srv/Disk 1.img -> disk-1. */
export function nameFromBacking(path: string): string {
  const base = path.split('/').filter(Boolean).pop() ?? '';
  const name = base
    .replace(/\.[^.]*$/, '')
    .toLowerCase()
    .replace(/[^a-z0-9_-]+/g, '-')
    .replace(/^[-_]+/, '')
    .slice(0, 32);
  return name || 'cldd';
}
