import { open, rm, stat } from 'node:fs/promises';
import { CldError } from '../errors.js';
import { MAX_BLOCK_SIZE, SUPERBLOCK_COPIES, computeLayout } from '../engine/format.js';
import { Volume, readSuperblocks } from '../engine/volume.js';
import { probeForeignData } from '../daemon/probe.js';
import { FileStore } from '../store/file-store.js';
import type { BlockStore } from '../store/block-store.js';
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

const FORMAT_ANEW = 'cldd add --force formats it anew, destroying its contents';

/**
 * Makes BACKING a cldd store, or finds that it is one. Refusals change nothing on disk: every
 * check runs before the first write, and a file this call created is removed again.
 * A cldd store is reattached, never formatted again, unless its blocks are too large for a block
 * device here; then, as with any other data, only --force formats it.
 */
export async function prepareBacking(path: string, options: PrepareOptions): Promise<Prepared> {
  const blockSize = options.blockSize ?? DEFAULT_BLOCK_SIZE;
  let created = false;
  const exists = await stat(path).then(
    () => true,
    (err) => {
      if ((err as { code?: string }).code === 'ENOENT') return false;
      throw err;
    },
  );
  if (!exists) {
    if (options.size === undefined) throw new CldError('ENOENT', `${path} does not exist (give --size to create it)`);
    computeLayout(options.size, blockSize); // too small: refused before the file exists
    const fh = await open(path, 'wx', 0o600).catch((err) => {
      throw new CldError((err as { code?: string }).code ?? 'EIO', `cannot create ${path}: ${(err as Error).message}`);
    });
    try {
      await fh.truncate(options.size);
    } finally {
      await fh.close();
    }
    created = true;
  } else if (options.size !== undefined) {
    throw new CldError('EEXIST', `${path} already exists; --size only creates a new file`);
  }

  try {
    const store = await FileStore.open(path);
    try {
      let existing: Prepared | null = null;
      try {
        const { sb } = await readSuperblocks(store);
        // Read only: a daemon may reattach it, and the daemon's open does the recovery.
        if (sb.layout.blockSize > MAX_DEVICE_BLOCK_SIZE) {
          if (!options.force) {
            throw new CldError(
              'EINVAL',
              `${path} is a cldd store with ${sb.layout.blockSize}-byte blocks, which cannot be attached: ${DEVICE_BLOCK_LIMIT}; ${FORMAT_ANEW}`,
            );
          }
        } else {
          existing = { how: 'existing', state: sb.state, capacity: sb.layout.blocks * sb.layout.blockSize };
          if (options.blockSize !== undefined && options.blockSize !== sb.layout.blockSize) {
            throw new CldError('EINVAL', `${path} is a cldd store with ${sb.layout.blockSize}-byte blocks, not ${options.blockSize}`);
          }
        }
      } catch (err) {
        const code = (err as CldError).code;
        if (code === 'CLDD_CORRUPT' && !options.force) {
          throw new CldError('CLDD_CORRUPT', `${(err as Error).message}; see cldd check ${path}; ${FORMAT_ANEW}`);
        }
        if (code !== 'CLDD_FOREIGN' && code !== 'CLDD_CORRUPT') throw err;
      }
      if (existing) return existing;
      if (!created && !options.force) {
        const foreign = await probeForeignData(path, store);
        if (foreign) {
          throw new CldError('CLDD_FOREIGN', `${path} holds ${foreign.description}; cldd add --force formats it, destroying that data`);
        }
      }
      // Formatting: a new file, an empty store, or --force. The last check writes nothing either.
      computeLayout(store.size, blockSize);
      if (!created) await wipeForFormat(store);
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

/**
 * Before a format over old contents: zero the first 2 x 64 KiB, where an older cldd store's
 * superblock copy 1 lies for any block size, so that damaged new copies can never bring back a
 * store formatted before.
 */
async function wipeForFormat(store: BlockStore): Promise<void> {
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
