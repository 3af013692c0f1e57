/**
 * What the engine publishes for the native queue threads, so that they serve the requests whose
 * plan is a pure function of it without a round trip through JS (docs/serving.md has the whole
 * protocol and why it is safe):
 *
 *   - `words[MODE]`: FAST_MODE.off, or the volume's state while the fast path may serve;
 *   - `words[COMMIT_PENDING]`: 1 while a flush has something to commit (dirty map pages, a state
 *     change not yet written, or a commit still running), so it must go to the engine;
 *   - `words[GENERATION]`: bumped at every publication, for reports;
 *   - `words[REDIRECTED]`: first touches a queue thread redirected (MapRedirector) that the
 *     volume has not taken yet;
 *   - `words[MAP_CHANGES]`: map changes made so far (the volume's and the threads'), each counted
 *     once its data completed, so that a flush's queue thread can tell whether its own fdatasync
 *     covers a commit's first one (docs/serving.md, "A flush's own sync"); wraps at 2^32;
 *   - `words[NATIVE_COMMIT]`: 1 while a queue thread's map commit runs (MapRedirector's
 *     captureCommit to commitDone, on the thread): the volume waits for it before a commit of
 *     its own, and a flush meanwhile has something to commit;
 *   - the redirect bitmap, `BlockMap.bits`, shared and not copied.
 *
 * Words are written with Atomics (sequentially consistent), read natively with seq_cst loads. The
 * numbers below are native/wire.h's too: test/wire.test.ts checks that both agree.
 */
import type { VolumeState } from '../format/format.js';

export const PUBLISHED_WORD = { mode: 0, commitPending: 1, generation: 2, redirected: 3, mapChanges: 4, nativeCommit: 5 } as const;
export const PUBLISHED_WORDS = 6;

export const FAST_MODE = { off: 0, plain: 1, snapshot: 2, resync: 3 } as const satisfies Record<'off' | VolumeState, number>;

/**
 * A server whose native threads serve requests through the fast path. `idle()` resolves once
 * none of its fast-path requests is in flight: the volume turns the fast path off, then waits
 * for that, before a state change or a close (nothing it served may straddle one).
 */
export interface FastPathServer {
  idle(): Promise<void>;
  /** The requests it holds, oldest first (a few), for a state change that gives up on them; or ''. */
  describeRequests(): string;
  /** What it served so far; the volume adds these into its counters. */
  counters(): FastPathCounters;
}

/**
 * Where the queue threads redirect the first touches they wrote in a snapshot themselves
 * (native/redirector.h; docs/serving.md, "A first touch in a snapshot"): they set the bits, write
 * the journal's records and raise commitPending under its lock. The volume holds that lock
 * whenever it reads or changes what those touch (its own map changes, a commit's capture, the
 * journal's trim, commitPending lowered), and takes the redirects made since the last hold first.
 */
export interface MapRedirector {
  /**
   * Takes the lock; returns [the journal's length, start, end, set, captured, ...]: the blocks
   * redirected since the last hold, how many of each range's bits the thread found clear, and
   * whether a queue thread's map commit holds them (1: their pages and marks are that commit's,
   * not dirty); null when none were.
   */
  hold(): Float64Array | null;
  /**
   * Where the journal is now (-1: none), whether the threads may redirect, and whether a queue
   * thread may commit their redirects itself, for a master flush or FUA write (the volume has
   * nothing of its own to commit and no commit of its own runs); drops the lock.
   */
  release(journalFd: number, journalLength: number, enabled: boolean, commitAllowed?: boolean): void;
  /** Under hold(): what a queue thread's map commit works on (docs/serving.md). */
  configureCommit?(setup: NativeCommitSetup): void;
}

/**
 * What a queue thread's map commit reads and writes, shared with the volume (not copied) and
 * touched by either side only under the map lock, or while the other cannot commit: the commit
 * writer's page slots and state (COMMIT_STATE in commit.ts), the committed superblock's image,
 * the tracking marks in memory, and the layout.
 */
export interface NativeCommitSetup {
  slot: Uint8Array;
  sequence: Float64Array;
  slotCommit: Float64Array;
  state: Float64Array;
  superblock: Uint8Array;
  marked: Uint32Array | null;
  blockSize: number;
  mapOffset: number;
  mapPages: number;
  trackingPages: number;
  trackingBitsPerPage: number;
}


/** A first touch in a snapshot that a queue thread wrote, for the volume to redirect. */
export interface FastWrite {
  offset: number;
  length: number;
  /** Whether its write succeeded. */
  ok: boolean;
}

export interface FastPathCounters {
  reads: number;
  writes: number;
  flushes: number;
  bytesRead: number;
  bytesWritten: number;
  errors: number;
  /** The queue threads' polls before they sleep (docs/serving.md): caught a request, ran out. */
  pollsCaught: number;
  pollsRanOut: number;
}

export class Publication {
  readonly words = new Int32Array(PUBLISHED_WORDS);
  private suspended = 0;
  private state: VolumeState;
  private stopped = false;

  constructor(
    /** The redirect bitmap, BlockMap.bits. */
    readonly bits: Uint32Array,
    state: VolumeState,
  ) {
    this.state = state;
    this.publishMode();
  }

  get mode(): number {
    return Atomics.load(this.words, PUBLISHED_WORD.mode);
  }

  /** The volume's state changed (at once when the fast path is on, else when it resumes). */
  setState(state: VolumeState): void {
    this.state = state;
    this.publishMode();
  }

  /** Turns the fast path off until the matching resume(); nestable. */
  suspend(): void {
    this.suspended++;
    this.publishMode();
  }

  resume(): void {
    if (this.suspended > 0) this.suspended--;
    this.publishMode();
  }

  /** Off for good: the volume failed or closed. */
  stop(): void {
    this.stopped = true;
    this.publishMode();
  }

  setCommitPending(pending: boolean): void {
    const value = pending ? 1 : 0;
    if (Atomics.load(this.words, PUBLISHED_WORD.commitPending) === value) return;
    Atomics.store(this.words, PUBLISHED_WORD.commitPending, value);
    Atomics.add(this.words, PUBLISHED_WORD.generation, 1);
  }

  /** Counts a map change: after its data completed, before its bits change (Volume.changeMaps). */
  countMapChange(): void {
    Atomics.add(this.words, PUBLISHED_WORD.mapChanges, 1);
  }

  /** Map changes counted so far, as a uint32 (the word wraps). */
  get mapChanges(): number {
    return Atomics.load(this.words, PUBLISHED_WORD.mapChanges) >>> 0;
  }

  private publishMode(): void {
    const mode = this.stopped || this.suspended > 0 ? FAST_MODE.off : FAST_MODE[this.state];
    if (Atomics.load(this.words, PUBLISHED_WORD.mode) === mode) return;
    Atomics.store(this.words, PUBLISHED_WORD.mode, mode);
    Atomics.add(this.words, PUBLISHED_WORD.generation, 1);
  }
}
