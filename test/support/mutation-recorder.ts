import type { BlockStore } from '../../src/io/block-store.js';

/**
 * Wraps a store: reads pass through, and every write, zero or flush is recorded instead of done.
 * Tests use it to prove that a refusal or a check changed nothing on disk.
 */
export class MutationRecorder implements BlockStore {
  readonly size: number;
  readonly description: string;
  readonly mutations: string[] = [];

  constructor(private readonly inner: BlockStore) {
    this.size = inner.size;
    this.description = inner.description;
  }

  read(buffer: Uint8Array, offset: number): Promise<void> {
    return this.inner.read(buffer, offset);
  }

  async write(_data: Uint8Array, offset: number): Promise<void> {
    this.mutations.push(`write at ${offset}`);
  }

  async zero(offset: number): Promise<void> {
    this.mutations.push(`zero at ${offset}`);
  }

  async flush(): Promise<void> {
    this.mutations.push('flush');
  }

  async close(): Promise<void> {}
}
