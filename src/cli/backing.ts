import { open, rm, stat } from 'node:fs/promises';
import { CldError } from '../errors.js';
import { Volume, readSuperblocks } from '../engine/volume.js';
import { probeForeignData } from '../daemon/probe.js';
import { FileStore } from '../store/file-store.js';

export interface PrepareOptions {
  /** Create a regular file of this many bytes when the backing store does not exist. */
  size?: number;
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
 * Makes BACKING a cldd store, or finds that it is one. Refusals change nothing on disk: a file
 * this call created is removed again, and nothing is written before every check has passed.
 * Existing cldd stores are never formatted again; other data is destroyed only with force.
 */
export async function prepareBacking(path: string, options: PrepareOptions): Promise<Prepared> {
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
        existing = { how: 'existing', state: sb.state, capacity: sb.layout.blocks * sb.layout.blockSize };
        if (options.blockSize !== undefined && options.blockSize !== sb.layout.blockSize) {
          throw new CldError('EINVAL', `${path} is a cldd store with ${sb.layout.blockSize}-byte blocks, not ${options.blockSize}`);
        }
      } catch (err) {
        const code = (err as CldError).code;
        if (code === 'CLDD_CORRUPT' && !options.force) {
          throw new CldError(
            'CLDD_CORRUPT',
            `${(err as Error).message}; see cldd check ${path}; --force formats it anew, destroying its contents`,
          );
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
      const volume = await Volume.format(store, { blockSize: options.blockSize, name: options.name });
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
