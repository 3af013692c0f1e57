/**
 * Deciding is separate from doing: the engine turns each request into a Plan, an executor runs
 * its I/O. The tests run plans on a BlockStore (test/support/disk.ts); the native executor
 * runs the same plans on io_uring. Both follow the same contract:
 *
 *  1. run every op of `ops` (they do not overlap and may run concurrently, in any order);
 *  2. call `finish(ok)` exactly once, ok = every op succeeded. If `orderedFinish` is true,
 *     finish must run before the request is completed (it changes the block map, so a read
 *     issued after completion must see the change); otherwise it may run after completion;
 *  3. if `commit` is true (flush, FUA), await `volume.commit()` after finish and before
 *     completing the request.
 */

import type { IoOp } from '../io/block-store.js';

export type { IoKind, IoOp } from '../io/block-store.js';

export type Target = 'master' | 'slave';
export type RequestOp = 'read' | 'write' | 'flush' | 'discard' | 'write-zeroes';

export interface Request {
  target: Target;
  op: RequestOp;
  /** Byte offset on the device; a multiple of the block size. */
  offset: number;
  /** Byte length; a multiple of the block size (0 for flush). */
  length: number;
  /** Forced unit access: durable before completion. */
  fua?: boolean;
}

export interface Plan {
  readonly ops: readonly IoOp[];
  readonly orderedFinish: boolean;
  readonly commit: boolean;
  finish(ok: boolean): void;
}

/** Runs the I/O of plans. Rejects with a CldError carrying an errno code. */
export interface Executor {
  run(ops: readonly IoOp[], buffer: Uint8Array): Promise<void>;
  /**
   * A merge's copy (`Merge.runs`: change-area offset, data-area offset, length, buffer offset per
   * run): what `run(merge.reads)` then `run(merge.writes)` would do, one op after another, where
   * the executor has a cheaper way to (NativeStore: blocking calls on one thread). `buffer` may
   * be shorter than the runs' bytes: then it is a bounce buffer the runs go through in pieces,
   * and no run may read what another writes (a merge's never do).
   */
  copy?(runs: Float64Array, buffer: Uint8Array): Promise<void>;
  /** The caller is done with `buffer` for now: its memory may go back (its contents need not stay). */
  releaseBuffer?(buffer: Uint8Array): void;
}
