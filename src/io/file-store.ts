import { constants, promises as fs } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import { CldError, ioError } from '../errors.js';
import { devId } from '../devnum.js';
import type { BlockStore } from './block-store.js';

const ZERO_BUFFER = new Uint8Array(1 << 20);

export interface FileStoreOptions {
  /** Open read-only (for check and inspection). */
  readOnly?: boolean;
}

/**
 * A regular file or a block device. Block devices are opened with O_EXCL, so a device that is
 * mounted or held by another program is refused with EBUSY instead of being written under it.
 */
export class FileStore implements BlockStore {
  private closed = false;

  private constructor(
    private readonly handle: FileHandle,
    readonly size: number,
    readonly description: string,
    readonly isBlockDevice: boolean,
  ) {}

  static async open(path: string, options: FileStoreOptions = {}): Promise<FileStore> {
    let st;
    try {
      st = await fs.stat(path);
    } catch (err) {
      const code = (err as { code?: string }).code;
      if (code === 'ENOENT') throw new CldError('ENOENT', `${path} does not exist`, { cause: err });
      if (code === 'EACCES') throw new CldError('EACCES', `${path}: permission denied`, { cause: err });
      throw ioError(`open ${path}`, err);
    }
    if (!st.isFile() && !st.isBlockDevice()) {
      throw new CldError('EINVAL', `${path} is neither a regular file nor a block device`);
    }
    const blockDevice = st.isBlockDevice();
    let flags = options.readOnly ? constants.O_RDONLY : constants.O_RDWR;
    if (blockDevice && !options.readOnly) flags |= constants.O_EXCL;
    let handle: FileHandle;
    try {
      handle = await fs.open(path, flags);
    } catch (err) {
      if ((err as { code?: string }).code === 'EACCES') {
        throw new CldError('EACCES', `${path}: permission denied (are you root?)`, { cause: err });
      }
      if ((err as { code?: string }).code === 'EBUSY') {
        throw new CldError('EBUSY', `${path} is busy (mounted, attached or open by another program)`, { cause: err });
      }
      throw ioError(`open ${path}`, err);
    }
    const size = blockDevice ? await blockDeviceSize(path, st.rdev) : st.size;
    return new FileStore(handle, size, path, blockDevice);
  }

  async read(buffer: Uint8Array, offset: number): Promise<void> {
    this.checkRange('read', offset, buffer.length);
    let done = 0;
    while (done < buffer.length) {
      let n: number;
      try {
        ({ bytesRead: n } = await this.handle.read(buffer, done, buffer.length - done, offset + done));
      } catch (err) {
        throw ioError(`read ${this.description} at ${offset + done}`, err);
      }
      if (n === 0) throw new CldError('EIO', `read ${this.description} at ${offset + done}: unexpected end of file`);
      done += n;
    }
  }

  async write(data: Uint8Array, offset: number): Promise<void> {
    this.checkRange('write', offset, data.length);
    let done = 0;
    while (done < data.length) {
      let n: number;
      try {
        ({ bytesWritten: n } = await this.handle.write(data, done, data.length - done, offset + done));
      } catch (err) {
        throw ioError(`write ${this.description} at ${offset + done}`, err);
      }
      done += n;
    }
  }

  async zero(offset: number, length: number): Promise<void> {
    this.checkRange('zero', offset, length);
    for (let done = 0; done < length; ) {
      const n = Math.min(ZERO_BUFFER.length, length - done);
      await this.write(ZERO_BUFFER.subarray(0, n), offset + done);
      done += n;
    }
  }

  async flush(): Promise<void> {
    try {
      await this.handle.datasync();
    } catch (err) {
      throw ioError(`flush ${this.description}`, err);
    }
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.handle.close();
  }

  private checkRange(op: string, offset: number, length: number): void {
    if (this.closed) throw new CldError('CLDD_CLOSED', `${op} ${this.description}: the store is closed`);
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.size) {
      throw new CldError('EINVAL', `${op} ${this.description}: ${length} bytes at ${offset} is outside 0..${this.size}`);
    }
  }
}

/** Node's stat gives a block device size 0; sysfs knows it in 512-byte sectors. */
async function blockDeviceSize(path: string, rdev: number): Promise<number> {
  const sysfs = `/sys/dev/block/${devId(rdev)}/size`;
  try {
    const sectors = Number((await fs.readFile(sysfs, 'utf8')).trim());
    if (!Number.isSafeInteger(sectors)) throw new Error(`bad value in ${sysfs}`);
    return sectors * 512;
  } catch (err) {
    throw ioError(`size of ${path}`, err);
  }
}
