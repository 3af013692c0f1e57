/** One I/O of a plan (src/engine/plan.ts) on the backing store. */
export type IoKind = 'read' | 'write' | 'zero';

export interface IoOp {
  kind: IoKind;
  /** Byte offset in the backing store. */
  offset: number;
  length: number;
  /** Where in the request's buffer the bytes go (read) or come from (write); 0 for zero. */
  bufferOffset: number;
}

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
  /**
   * Runs `steps` as inOrder() does, where the store has a cheaper way to (NativeStore: one call
   * on a worker thread instead of a round trip per step).
   */
  sequence?(steps: readonly OrderedStep[]): Promise<void>;
  close(): Promise<void>;
}

/**
 * A step of a commit: a write, or a flush that makes the writes before it durable. A flush with
 * `skippableAt` may be left out by a runner that made every write it must cover durable itself:
 * a flush's queue thread whose own fdatasync began at that map-change count (docs/serving.md,
 * "A flush's own sync"). A store always runs it.
 */
export type OrderedStep = { kind: 'write'; data: Uint8Array; offset: number } | { kind: 'flush'; skippableAt?: number };
export const FLUSH: OrderedStep = { kind: 'flush' };

/** Runs a commit's steps as inOrder() would, or returns null to leave them to the store. */
export type StepRunner = (steps: readonly OrderedStep[]) => Promise<void> | null;

/** The bytes a commit's steps write. */
export function writtenBytes(steps: readonly OrderedStep[]): number {
  let bytes = 0;
  for (const step of steps) if (step.kind === 'write') bytes += step.data.length;
  return bytes;
}

/**
 * Lays `steps` out as the native side takes them: a (kind, offset, length, bufferOffset) record
 * each from `records[at]`, a flush as (kinds.flush, 0, 0, 0), or, where `kinds.skippable` is
 * given, a flush with `skippableAt` as (kinds.flush, skippableAt, 0, kinds.skippable), and the
 * writes' bytes one after another in `bytes` (which holds writtenBytes(steps)).
 */
export function packSteps(steps: readonly OrderedStep[], kinds: { write: number; flush: number; skippable?: number }, records: Float64Array, at: number, bytes: Uint8Array): void {
  let used = 0;
  for (const step of steps) {
    if (step.kind === 'flush') {
      records[at] = kinds.flush;
      records[at + 1] = records[at + 2] = records[at + 3] = 0;
      if (kinds.skippable !== undefined && step.skippableAt !== undefined) {
        records[at + 1] = step.skippableAt;
        records[at + 3] = kinds.skippable;
      }
    } else {
      bytes.set(step.data, used);
      records[at] = kinds.write;
      records[at + 1] = step.offset;
      records[at + 2] = step.data.length;
      records[at + 3] = used;
      used += step.data.length;
    }
    at += 4;
  }
}

/**
 * Runs `steps` so that each flush starts after every write before it completed, and each write
 * after the flush before it; writes between two flushes run concurrently (in any order, as a
 * fault-injecting store completes them). The first error rejects and nothing after it starts.
 */
export async function inOrder(store: BlockStore, steps: readonly OrderedStep[]): Promise<void> {
  if (store.sequence) return store.sequence(steps);
  let writes: Promise<void>[] = [];
  for (const step of steps) {
    if (step.kind === 'write') {
      writes.push(store.write(step.data, step.offset));
      continue;
    }
    await Promise.all(writes);
    writes = [];
    await store.flush();
  }
  await Promise.all(writes);
}

export const SECTOR = 512;
