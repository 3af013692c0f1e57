import { CldError } from '../errors.js';
import type { BlockStore } from './block-store.js';

const CHUNK = 4096;
const ZERO_CHUNK = new Uint8Array(CHUNK);

/**
 * A sparse in-memory store: only chunks that were written hold memory, so a test can format a
 * store of many gigabytes and touch a few megabytes of it. Writes are durable at once.
 */
export class MemoryStore implements BlockStore {
  readonly description = 'memory';
  private readonly chunks = new Map<number, Uint8Array>();

  constructor(readonly size: number) {
    if (!Number.isSafeInteger(size) || size < 0) throw new CldError('EINVAL', `memory store: bad size ${size}`);
  }

  /** Copies another memory store's contents (used to take crash images). */
  static copyOf(other: MemoryStore): MemoryStore {
    const copy = new MemoryStore(other.size);
    for (const [index, chunk] of other.chunks) copy.chunks.set(index, chunk.slice());
    return copy;
  }

  /** Bytes of memory held by written chunks. */
  get residentBytes(): number {
    return this.chunks.size * CHUNK;
  }

  readSync(buffer: Uint8Array, offset: number): void {
    this.checkRange('read', offset, buffer.length);
    let done = 0;
    while (done < buffer.length) {
      const pos = offset + done;
      const index = Math.floor(pos / CHUNK);
      const within = pos - index * CHUNK;
      const n = Math.min(CHUNK - within, buffer.length - done);
      const chunk = this.chunks.get(index);
      if (chunk) buffer.set(chunk.subarray(within, within + n), done);
      else buffer.fill(0, done, done + n);
      done += n;
    }
  }

  writeSync(data: Uint8Array, offset: number): void {
    this.checkRange('write', offset, data.length);
    let done = 0;
    while (done < data.length) {
      const pos = offset + done;
      const index = Math.floor(pos / CHUNK);
      const within = pos - index * CHUNK;
      const n = Math.min(CHUNK - within, data.length - done);
      let chunk = this.chunks.get(index);
      if (!chunk) {
        chunk = new Uint8Array(CHUNK);
        this.chunks.set(index, chunk);
      }
      chunk.set(data.subarray(done, done + n), within);
      done += n;
    }
  }

  zeroSync(offset: number, length: number): void {
    this.checkRange('zero', offset, length);
    let done = 0;
    while (done < length) {
      const pos = offset + done;
      const index = Math.floor(pos / CHUNK);
      const within = pos - index * CHUNK;
      const n = Math.min(CHUNK - within, length - done);
      if (n === CHUNK) this.chunks.delete(index);
      else this.chunks.get(index)?.set(ZERO_CHUNK.subarray(0, n), within);
      done += n;
    }
  }

  async read(buffer: Uint8Array, offset: number): Promise<void> {
    this.readSync(buffer, offset);
  }

  async write(data: Uint8Array, offset: number): Promise<void> {
    this.writeSync(data, offset);
  }

  async zero(offset: number, length: number): Promise<void> {
    this.zeroSync(offset, length);
  }

  async flush(): Promise<void> {}

  async close(): Promise<void> {}

  private checkRange(op: string, offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || offset < 0 || length < 0 || offset + length > this.size) {
      throw new CldError('EINVAL', `memory store: ${op} of ${length} bytes at ${offset} is outside 0..${this.size}`);
    }
  }
}
