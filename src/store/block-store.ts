/**
 * The backing store seen by the engine: a byte-addressed device with a volatile write cache.
 * A write is durable only once a later flush() completes; zero() is a write of zeros.
 */
export interface BlockStore {
  /** Usable size in bytes. */
  readonly size: number;
  /** Human-readable name for messages (a path, or "memory"). */
  readonly description: string;
  /** Fills `buffer` with the bytes at `offset`. */
  read(buffer: Uint8Array, offset: number): Promise<void>;
  write(data: Uint8Array, offset: number): Promise<void>;
  /** Makes the range read back as zeros (punching holes where the store can). */
  zero(offset: number, length: number): Promise<void>;
  /** Makes every write that completed before this call durable. */
  flush(): Promise<void>;
  close(): Promise<void>;
}

export const SECTOR = 512;
