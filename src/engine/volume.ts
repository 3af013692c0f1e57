/**
 * The checkpoint engine. A Volume owns one formatted store and decides every request:
 *
 *   plain     master reads and writes go to the data area; nothing is redirected.
 *   snapshot  the data area is frozen: it is the slave image. A master write to block b goes to
 *             slot b of the change area and sets b's redirect bit; master reads follow the bits;
 *             slave reads come from the data area.
 *   resync    the slave is gone; merges copy redirected blocks back into the data area and clear
 *             their bits. A master write to a redirected block goes to the data area and clears
 *             the bit (range locks keep it off blocks being merged).
 *
 * The requests whose plan is a pure function of the state and the redirect bitmap (reads, plain
 * writes, writes to blocks already redirected, flushes with nothing to commit) may be served by
 * the native queue threads without calling plan(): the volume publishes what they need
 * (publication.ts) and turns that path off, and waits for it, around every state change
 * (docs/serving.md).
 *
 * Durability follows a disk with a volatile write cache: map changes are made in memory when a
 * write completes and committed by the next flush or FUA write (see commit() and
 * docs/format.md for why every crash point is safe).
 */
import { within } from '../deadline.js';
import { CldError } from '../errors.js';
import type { BlockStore, StepRunner } from '../io/block-store.js';
import { BlockMap } from './block-map.js';
import { ChangeTracking, NO_MARKS } from './change-tracking.js';
import type { Layout, MapRecord, Superblock, VolumeState } from '../format/format.js';
import type { IoOp, Plan, Request } from './plan.js';
import { type MapChange, MapJournal } from '../format/map-journal.js';
import { type FastPathCounters, type FastPathServer, type FastWrite, type MapRedirector, PUBLISHED_WORD, Publication } from './publication.js';
import { RangeLocks, type RangeLock } from './range-lock.js';
import { allRedirected, checkRequest, extent, masterReadExtents, noneRedirected } from './extents.js';
import { COMMIT_STATE, CommitWriter, type PageSlots } from './commit.js';
import { encodeSuperblockInto } from '../format/format.js';
import { type FormatOptions, formatStore, type OpenOptions, recoverStore, replayJournal } from './open.js';

export type { VolumeState } from '../format/format.js';
export type { FormatOptions, OpenOptions } from './open.js';

/** See Volume.drainLimitMs. */
export const DRAIN_LIMIT_MS = 30_000;

/**
 * How far a merge window may span, in multiples of the redirected blocks it may hold. A master
 * write inside the span waits for the window's copy. Four: the bench's random first touches
 * leave about 60% of the blocks redirected, so a full window spans 1.7 times its blocks; windows
 * stay full down to a quarter redirected, and sparser maps get windows of a quarter of their span.
 */
export const MERGE_SPAN_FACTOR = 4;

/**
 * Records of the map journal no commit covers, past which the volume commits without being
 * asked (commitForJournal): 174,762 first touches, 4 MiB of RAM on tmpfs at most, and a replay
 * the next start reads in one go. A commit costs three fdatasyncs; a writer of 4 KiB first
 * touches at 100,000 a second would pay them every 1.7 s, and the bench's 10 s first-touch jobs
 * in the test VM (4,000 to 16,000 a second) once at most.
 */
export const JOURNAL_COMMIT_BYTES = 4 << 20;

/**
 * How long a commit of the volume's own waits for a queue thread's map commit to finish: that is
 * a flush's pages and superblock with their fdatasyncs (0.45-0.56 ms in the bench's VM,
 * docs/benchmarks.md), so only a stuck backing store takes longer; the map lock's own bound.
 */
export const NATIVE_COMMIT_WAIT_MS = 10_000;

export interface VolumeCounters {
  reads: number;
  writes: number;
  flushes: number;
  discards: number;
  bytesRead: number;
  bytesWritten: number;
  errors: number;
  /** Commits made durable, by the engine or by a queue thread (for a master flush or FUA write). */
  commits: number;
  /** Of those, the ones a queue thread built and ran itself (docs/serving.md). */
  queueCommits: number;
  mergedBlocks: number;
  /** Requests the queue threads served by themselves (docs/serving.md), counted in the above too. */
  fastPath: number;
  /** The queue threads' polls before they sleep (docs/serving.md): caught a request, ran out. */
  pollsCaught: number;
  pollsRanOut: number;
}

export interface VolumeStatus {
  name: string;
  uuid: string;
  state: VolumeState;
  blockSize: number;
  capacity: number;
  blocks: number;
  redirected: number;
  epoch: number;
  stateChangedAt: number;
  createdAt: number;
  inFlight: number;
  dirtyMapPages: number;
  /** Changed-block tracking; null for a store whose format has none (version 2 and older). */
  tracking: TrackingStatus | null;
  /** The map journal (src/format/map-journal.ts); null for a volume opened without one. */
  journal: JournalStatus | null;
  failed: string | null;
  counters: VolumeCounters;
}

export interface TrackingStatus {
  chunkSize: number;
  /** The snapshot the current set counts from, and the bytes (whole chunks) written since. */
  since: number;
  changedBytes: number;
  /** The last delta (snapshot since-1 -> since), in bytes; null before the second snapshot's period. */
  deltaBytes: number | null;
}

export interface JournalStatus {
  /** Its size, and how much of it no finished commit covers. */
  bytes: number;
  uncommittedBytes: number;
  /** Why committed records cannot be dropped (its last compaction failed), or null. */
  compactionError: string | null;
}

/** One step of a resync: copy `reads` (change area) into the buffer, then `writes` (data area). */
export interface Merge {
  readonly start: number;
  readonly end: number;
  /** Blocks actually copied (bits still set once the range was locked). */
  readonly blocks: number;
  /**
   * The window's redirected runs, four numbers each, in bytes: the change-area offset, the
   * data-area offset, the length and the offset in the copy buffer (the runs packed one after
   * another, `bufferLength` in all). Built once per window, for
   * a native copy to take as they are: a window of random first touches holds about 200 runs,
   * and their op objects, built and collected for every window, took the daemon's main thread
   * (and V8's collector) from the copy, which shares the VM's two vCPUs with them. Picking the
   * 128 windows of such a resync took 104-167 ms so, 208-270 ms with the op objects (7.3 TCG
   * VM, three alternating rounds; docs/benchmarks.md).
   */
  readonly runs: Float64Array;
  /** The runs as ops (`reads` of the change area, `writes` of the data area), made when asked. */
  readonly reads: readonly IoOp[];
  readonly writes: readonly IoOp[];
  readonly bufferLength: number;
  finish(ok: boolean): void;
}

export class Volume {
  readonly layout: Layout;
  readonly map: BlockMap;
  /** Which chunks changed since the last snapshot (change-tracking.ts); null in an older store. */
  readonly tracking: ChangeTracking | null;
  /** The committed superblock; `map` is never null here (a version 1 store is upgraded). */
  private sb: Superblock & { map: MapRecord };
  /** Both superblock copies must be rewritten: the state changed, or a copy is invalid or behind. */
  private sbDirty = false;
  /** Where the committed metadata is, and how a commit moves it forward. */
  private readonly writer: CommitWriter;
  private readonly locks = new RangeLocks();
  private readonly now: () => number;

  private inFlight = 0;
  private mergesInFlight = 0;
  private drainWaiters: (() => void)[] = [];
  /**
   * How long a state change (enable, disable, close) waits for the requests in flight. They are
   * backing I/O of a request each, and the fast path's are drained first within as long.
   */
  drainLimitMs = DRAIN_LIMIT_MS;
  private gate: Promise<void> | null = null;
  private transitioning = false;
  private plainWaiters: { resolve: () => void; reject: (e: Error) => void }[] = [];
  private mergeCursor = 0;

  private commitRunning = false;
  /**
   * The running commit writes redirect pages or a state change: a flush must wait for it. One
   * that does neither (a FUA write's, one for tracking marks) holds no flush back.
   */
  private runningWritesMap = true;
  /** `marksOnly`: a write waiting for its chunks' marks, which needs no earlier data durable. */
  private commitWaiters: { resolve: () => void; reject: (e: Error) => void; marksOnly: boolean; run?: StepRunner }[] = [];
  private failure: CldError | null = null;
  private closed = false;
  private journal: MapJournal | null = null;
  /** A commit for the journal's length is queued or running (commitForJournal). */
  private journalCommit = false;
  /** What the native fast path reads, and the servers using it (drained around state changes). */
  readonly publication: Publication;
  private readonly fastServers = new Set<FastPathServer>();
  /** Where queue threads redirect first touches themselves (attachRedirector), or null. */
  private redirector: MapRedirector | null = null;
  /** Depth of withMapLock calls on the stack (the lock is taken by the outermost). */
  private mapLockDepth = 0;
  /** Queue threads' map commits taken into the bookkeeping (COMMIT_STATE.done). */
  private nativeCommitsSeen = 0;
  /** The superblock the commit state and its image hold (what a queue thread's commit builds on). */
  private publishedSb: Superblock | null = null;
  /** Whether the last release let a queue thread commit (nativeCommitAllowed). */
  private nativeCommitsAllowed = false;
  /** A commit of the volume's own waiting for a queue thread's to end (waitForNativeCommit). */
  private nativeCommitWaiter: (() => void) | null = null;

  readonly counters: VolumeCounters = {
    reads: 0,
    writes: 0,
    flushes: 0,
    discards: 0,
    bytesRead: 0,
    bytesWritten: 0,
    errors: 0,
    commits: 0,
    queueCommits: 0,
    mergedBlocks: 0,
    fastPath: 0,
    pollsCaught: 0,
    pollsRanOut: 0,
  };

  private constructor(
    readonly store: BlockStore,
    sb: Superblock & { map: MapRecord },
    sbCopy: number,
    map: BlockMap,
    pages: PageSlots,
    now: () => number,
    tracking = ChangeTracking.forStore(sb.layout, sb.epoch),
  ) {
    this.sb = sb;
    this.layout = sb.layout;
    this.map = map;
    this.tracking = tracking;
    this.writer = new CommitWriter(store, sb.layout, pages, sbCopy);
    this.now = now;
    this.publication = new Publication(map.bits, sb.state);
  }

  // ---------------------------------------------------------------- format and open

  /**
   * Formats `store`: the old signature is erased first, then the map, then both superblock
   * copies, so an interrupted format leaves no store that looks valid.
   */
  static async format(store: BlockStore, options: FormatOptions = {}): Promise<Volume> {
    const { sb, pages } = await formatStore(store, options);
    return new Volume(store, sb, 0, new BlockMap(sb.layout.blocks, sb.layout.blockSize), pages, options.now ?? Date.now);
  }

  /**
   * Opens a formatted store and recovers it (recovery.ts): the newest valid superblock copy and,
   * for every map page, the newest slot of a completed commit win; a half-written commit is
   * thereby discarded, a complete one whose superblock write is missing adopted. A foreign or
   * damaged store (a committed map slot that is gone included) is refused before anything is
   * written.
   */
  static async open(store: BlockStore, options: OpenOptions = {}): Promise<Volume> {
    const { sb, committed, copy, other, map, tracking, recovered, trackingPayloads } = await recoverStore(store);
    const { layout } = sb;
    const volume = new Volume(store, committed, copy, map, recovered, options.now ?? Date.now, tracking);
    volume.takeDirtyPagesFromLoad();
    if (options.journalPath) {
      // Changes a daemon that died had made: their data is in the page cache of this boot.
      const path = typeof options.journalPath === 'string' ? options.journalPath : options.journalPath(sb.uuid);
      const leftover = MapJournal.leftover(path, sb.uuid, layout.blocks);
      replayJournal(map, tracking, sb, leftover, path);
      volume.journal = MapJournal.create(path, sb.uuid, sb.epoch, leftover.changes);
    }
    // Rewrite pages whose other slot is torn or holds an uncommitted version: so both slots are
    // valid again, and a later commit never finds a stale version above its own.
    for (const page of recovered.rewrite) volume.rewritePage(page, trackingPayloads.get(page));
    // A crash between the last merge's commit and the superblock's move to plain.
    if (sb.state === 'resync' && map.count === 0) volume.setState('plain');
    // Both copies: to restore one that a crash (or damage) left invalid or with an older state,
    // to record a commit rolled forward, or to upgrade a version 1 store.
    if (other !== 'same' || recovered.rolledForward || sb.map === null) volume.sbDirty = true;
    if (volume.sbDirty || volume.map.dirtyPages > 0 || volume.writer.pendingRewrites > 0 || (tracking?.pendingPages ?? 0) > 0) await volume.commit();
    return volume;
  }

  private takeDirtyPagesFromLoad(): void {
    this.map.takeDirty();
  }

  /** A page open rewrites: a redirect page from the map, a tracking page as it was found. */
  private rewritePage(page: number, trackingPayload: Uint8Array | undefined): void {
    if (!this.tracking?.isTrackingPage(page)) return this.map.markDirty(page);
    this.writer.rewrite(page, trackingPayload);
  }

  // ---------------------------------------------------------------- properties

  get state(): VolumeState {
    return this.sb.state;
  }

  get blockSize(): number {
    return this.layout.blockSize;
  }

  /** Bytes the master (and the slave) offers. */
  get capacity(): number {
    return this.layout.blocks * this.layout.blockSize;
  }

  get name(): string {
    return this.sb.name;
  }

  get epoch(): number {
    return this.sb.epoch;
  }

  get superblock(): Readonly<Superblock> {
    return this.sb;
  }

  /** Foreground requests (not merges) being served. */
  get foregroundInFlight(): number {
    return this.inFlight - this.mergesInFlight;
  }

  get failed(): CldError | null {
    return this.failure;
  }

  status(): VolumeStatus {
    this.takeRedirects();
    return {
      name: this.sb.name,
      uuid: Buffer.from(this.sb.uuid).toString('hex'),
      state: this.sb.state,
      blockSize: this.layout.blockSize,
      capacity: this.capacity,
      blocks: this.layout.blocks,
      redirected: this.map.count,
      epoch: this.sb.epoch,
      stateChangedAt: this.sb.stateChangedAt,
      createdAt: this.sb.createdAt,
      inFlight: this.inFlight,
      dirtyMapPages: this.map.dirtyPages,
      tracking: this.tracking && {
        chunkSize: 2 ** this.tracking.chunkShift,
        since: this.tracking.since,
        changedBytes: this.tracking.changedBytes,
        deltaBytes: this.tracking.deltaBytes,
      },
      journal: this.journal && {
        bytes: this.journal.bytes,
        uncommittedBytes: this.journal.pending,
        compactionError: this.journal.compactionError,
      },
      failed: this.failure?.message ?? null,
      counters: [...this.fastServers].reduce((sum, server) => addCounters(sum, server.counters()), { ...this.counters }),
    };
  }

  /**
   * Registers a server whose native threads serve through the fast path; the volume waits for
   * its idle() around every state change and at close. Returns the function that removes it.
   */
  attachFastPath(server: FastPathServer): () => void {
    this.fastServers.add(server);
    return () => {
      // What it served stays counted.
      if (this.fastServers.delete(server)) addCounters(this.counters, server.counters());
    };
  }

  /**
   * Lets queue threads redirect the first touches they wrote in a snapshot themselves, through
   * `redirector` (publication.ts, MapRedirector), instead of handing each batch to
   * finishFastRedirects. One at a time. Returns the function that stops them again (it takes
   * what they redirected first).
   */
  attachRedirector(redirector: MapRedirector): () => void {
    if (this.redirector) throw new Error('a redirector is attached already');
    this.redirector = redirector;
    this.withMapLock(() => this.configureNativeCommit(redirector));
    return () => {
      if (this.redirector !== redirector) return;
      this.withMapLock(() => {}, false);
      this.redirector = null;
    };
  }

  /**
   * Takes the first touches queue threads redirected since the last time, if there are any; and
   * ends a wait for a queue thread's map commit that ended (the thread woke the engine for it).
   */
  takeRedirects(): void {
    if (this.redirector && Atomics.load(this.publication.words, PUBLISHED_WORD.redirected) !== 0) this.withMapLock(() => {});
    this.checkNativeCommitEnded();
  }

  /**
   * Runs `fn` under the redirector's lock, after taking what the queue threads redirected (their
   * bits into the map's counts and dirty pages, their chunks' marks, the journal's length), so
   * that `fn` sees the map as every completed write left it and no thread changes it meanwhile.
   * Then tells the threads where the journal is, and whether they may go on (`enabled`: the
   * volume neither failed nor closed). Synchronous: the threads wait for it.
   */
  private withMapLock<T>(fn: () => T, enabled = true): T {
    const r = this.redirector;
    if (!r || this.mapLockDepth > 0) return fn();
    const held = r.hold();
    this.mapLockDepth++;
    try {
      Atomics.store(this.publication.words, PUBLISHED_WORD.redirected, 0);
      // The redirects first: the journal's length moves on before a thread's commit trims it.
      if (held) this.takeRedirected(held);
      this.takeNativeCommits();
      return fn();
    } finally {
      this.mapLockDepth--;
      const journal = this.journal;
      const usable = enabled && !this.failure && !this.closed;
      this.nativeCommitsAllowed = usable && this.nativeCommitAllowed();
      if (this.nativeCommitsAllowed) this.publishCommitState();
      r.release(journal?.descriptor ?? -1, journal?.bytes ?? 0, usable, this.nativeCommitsAllowed);
    }
  }

  /**
   * What a queue thread commits with when it commits the threads' redirects itself, for a master
   * flush or FUA write (docs/serving.md, "A flush's commit on its queue thread"): the writer's
   * page slots and state, the committed superblock's image, the tracking marks. Shared, not copied.
   */
  private configureNativeCommit(r: MapRedirector): void {
    if (!r.configureCommit) return;
    const { layout, writer } = this;
    r.configureCommit({
      slot: writer.pages.slot,
      sequence: writer.pages.sequence,
      slotCommit: writer.pages.slotCommit,
      state: writer.state,
      superblock: writer.superblockImage,
      marked: this.tracking?.marked ?? null,
      blockSize: layout.blockSize,
      mapOffset: layout.mapOffset,
      mapPages: layout.mapPages,
      trackingPages: layout.trackingPages,
      trackingBitsPerPage: layout.trackingBitsPerPage,
    });
    this.publishedSb = null;
  }

  /**
   * Whether a queue thread may commit the redirects made since by itself: only when they are all
   * there is to commit (no page, mark, rewrite or superblock of the engine's is waiting, no
   * commit of its own runs or is asked for) in a snapshot, where its commit is the map-only one
   * of a first touch's flush. Anything else leaves every flush that must commit to the engine.
   */
  private nativeCommitAllowed(): boolean {
    return (
      this.redirector?.configureCommit !== undefined &&
      this.sb.state === 'snapshot' &&
      this.gate === null &&
      !this.commitRunning &&
      this.commitWaiters.length === 0 &&
      !this.sbDirty &&
      this.map.dirtyPages === 0 &&
      (this.tracking?.pendingPages ?? 0) === 0 &&
      this.writer.pendingRewrites === 0 &&
      this.writer.state[COMMIT_STATE.failed] === 0
    );
  }

  /** The committed superblock into the commit state and its image, when it changed since. */
  private publishCommitState(): void {
    const { state } = this.writer;
    state[COMMIT_STATE.period] = this.tracking?.since ?? 0;
    if (this.publishedSb === this.sb) return;
    state[COMMIT_STATE.generation] = this.sb.generation;
    state[COMMIT_STATE.mapCommit] = this.sb.map.commit;
    state[COMMIT_STATE.digest] = this.sb.map.digest;
    encodeSuperblockInto(this.writer.superblockImage, this.sb);
    this.publishedSb = this.sb;
  }

  /**
   * Takes the map commits queue threads completed since the last hold into the bookkeeping: the
   * superblock they left, the journal's records they cover. One that failed fails the volume, as
   * a failed commit of its own does.
   */
  private takeNativeCommits(): void {
    const { state } = this.writer;
    if (state[COMMIT_STATE.failed] !== 0 && !this.failure) {
      this.fail(new CldError('EIO', `a queue thread's map commit failed (errno ${state[COMMIT_STATE.failed]})`));
    }
    const done = state[COMMIT_STATE.done];
    if (done === this.nativeCommitsSeen) return;
    this.counters.commits += done - this.nativeCommitsSeen;
    this.counters.queueCommits += done - this.nativeCommitsSeen;
    this.nativeCommitsSeen = done;
    // The image is the thread's superblock: still this one's, unless the volume changed its own
    // since (a state change waiting for its commit), which the next publication encodes anew.
    const imaged = this.publishedSb === this.sb;
    this.sb = { ...this.sb, generation: state[COMMIT_STATE.generation], map: { commit: state[COMMIT_STATE.mapCommit], digest: state[COMMIT_STATE.digest] } };
    this.publishedSb = imaged ? this.sb : null;
    // A thread's commit captured after the ones taken here (its word raised, under this lock)
    // holds a journal mark in the file's bytes as they are now: no compaction or cut under it.
    // Commits back to back on the threads, before this hold, do that.
    const running = Atomics.load(this.publication.words, PUBLISHED_WORD.nativeCommit) !== 0;
    this.journal?.trim(state[COMMIT_STATE.journalMark], this.sb.epoch, !running);
  }

  /**
   * Before a commit of its own: no queue thread's map commit may run beside it (both move the
   * same slots and superblock copies on). The hold's release tells the threads to start none
   * (commitRunning is set); then, when one runs, this raises its word from 1 to 2, which makes
   * the thread that ends it wake the engine (takeRedirects ends the wait), at most
   * NATIVE_COMMIT_WAIT_MS: it is a flush's writes and fdatasyncs.
   */
  private async waitForNativeCommit(): Promise<void> {
    if (!this.redirector) return;
    if (this.nativeCommitsAllowed) this.withMapLock(() => {});
    const { words } = this.publication;
    if (Atomics.compareExchange(words, PUBLISHED_WORD.nativeCommit, 1, 2) === 0) return;
    const ended = new Promise<void>((resolve) => (this.nativeCommitWaiter = resolve));
    this.checkNativeCommitEnded();
    await within(ended, NATIVE_COMMIT_WAIT_MS, () => {
      this.nativeCommitWaiter = null;
      return new CldError('ETIMEDOUT', `a queue thread's map commit (commit ${this.writer.state[COMMIT_STATE.nextCommit]}) has not ended after ${NATIVE_COMMIT_WAIT_MS / 1000} s`);
    });
  }

  /** Ends waitForNativeCommit's wait once the thread's commit ended. */
  private checkNativeCommitEnded(): void {
    const waiter = this.nativeCommitWaiter;
    if (!waiter || Atomics.load(this.publication.words, PUBLISHED_WORD.nativeCommit) !== 0) return;
    this.nativeCommitWaiter = null;
    waiter();
  }

  /**
   * `held` as hold() returns it: the journal's length, then (start, end, set, captured) of each
   * redirect (captured: a queue thread's map commit holds it).
   */
  private takeRedirected(held: Float64Array): void {
    this.journal?.appendedTo(held[0]);
    // The marks as finishFastRedirects makes them, before any commit can capture the bits; a
    // queue thread's commit that holds a range made its marks.
    if (this.tracking) {
      for (let i = 1; i + 3 < held.length; i += 4) {
        if (held[i + 3] === 0 && this.tracking.needsMark(held[i], held[i + 1])) this.tracking.mark(held[i], held[i + 1]);
      }
    }
    this.map.absorb(held, 1);
    if (this.journal && this.journal.pending >= JOURNAL_COMMIT_BYTES) this.commitForJournal();
  }

  /** Whether a flush now has something to commit; published for the fast path. */
  private publishCommitPending(): void {
    if (this.map.dirtyPages > 0 || this.sbDirty || (this.commitRunning && this.runningWritesMap)) {
      this.publication.setCommitPending(true);
      return;
    }
    // Lowered only with the redirects the threads made taken: each raised it for its bits; and
    // not while a queue thread's map commit runs, whose pages are not durable yet.
    this.withMapLock(() =>
      this.publication.setCommitPending(
        this.map.dirtyPages > 0 || this.sbDirty || (this.commitRunning && this.runningWritesMap) || Atomics.load(this.publication.words, PUBLISHED_WORD.nativeCommit) !== 0,
      ),
    );
  }

  // ---------------------------------------------------------------- planning

  /** Decides a request. Returns a promise only when it has to wait (a state change or a merge). */
  plan(req: Request): Plan | Promise<Plan> {
    this.checkUsable();
    checkRequest(req, this.layout, this.sb.state);
    if (this.gate) return this.gate.then(() => this.plan(req));
    this.takeRedirects();
    this.inFlight++;
    const { blockSize } = this.layout;
    const start = req.offset / blockSize;
    const end = start + req.length / blockSize;
    switch (req.op) {
      case 'read':
        return req.target === 'slave' ? this.planSlaveRead(start, end) : this.planMasterRead(start, end);
      case 'flush':
        // The slave is read-only: a flush there has nothing to make durable.
        return this.simplePlan([], req.target === 'master', () => this.counters.flushes++);
      case 'write':
      case 'discard':
      case 'write-zeroes':
        if (this.tracking?.needsMark(start, end)) {
          // In a snapshot the write lands in the change area, where only its redirect makes it
          // part of the master: the mark made now is captured by every commit that can capture
          // the redirect, so it needs no commit of its own (change-tracking.ts).
          if (this.sb.state !== 'snapshot') return this.markThenPlan(req, start, end);
          this.tracking.mark(start, end);
        }
        return this.planMasterWrite(req, start, end);
    }
  }

  /**
   * A write to a chunk not yet marked in this tracking period waits for the commit that makes
   * its mark durable: the write may reach the disk as soon as it is issued, and a crash must not
   * leave it written but unmarked (change-tracking.ts). Every write waiting then shares one commit.
   */
  private async markThenPlan(req: Request, start: number, end: number): Promise<Plan> {
    try {
      this.tracking!.mark(start, end);
      await this.marksDurable();
    } catch (err) {
      this.leave(false);
      throw err;
    }
    return this.planMasterWrite(req, start, end);
  }

  /**
   * A commit whose capture follows every mark made so far. Marks made in the same turn (a batch
   * of requests is planned in one) share it: the commit is asked for once the turn is over.
   */
  private marksDurable(): Promise<void> {
    this.markCommit ??= Promise.resolve().then(() => {
      this.markCommit = null;
      return this.queueCommit(true);
    });
    return this.markCommit;
  }
  private markCommit: Promise<void> | null = null;

  private planSlaveRead(start: number, end: number): Plan {
    return this.simplePlan([extent(this.layout, 'read', 'data', start, end, 0)], false, () => this.countRead(start, end));
  }

  private planMasterRead(start: number, end: number): Plan {
    return this.simplePlan(masterReadExtents(this.layout, this.map, start, end), false, () => this.countRead(start, end));
  }

  private planMasterWrite(req: Request, start: number, end: number): Plan | Promise<Plan> {
    const kind = req.op === 'write' ? 'write' : 'zero';
    const commit = req.fua === true;
    const count = () => {
      if (req.op === 'write') {
        this.counters.writes++;
        this.counters.bytesWritten += req.length;
      } else {
        this.counters.discards++;
      }
    };
    switch (this.sb.state) {
      case 'plain':
        return this.simplePlan([extent(this.layout, kind, 'data', start, end, 0)], commit, count);
      case 'snapshot': {
        const ops = [extent(this.layout, kind, 'change', start, end, 0)];
        if (allRedirected(this.map, start, end)) return this.simplePlan(ops, commit, count);
        return this.mapPlan(ops, commit, () => {
          count();
          this.changeMap(start, end, true);
        });
      }
      case 'resync': {
        const ops = [extent(this.layout, kind, 'data', start, end, 0)];
        if (noneRedirected(this.map, start, end)) return this.simplePlan(ops, commit, count);
        const withLock = (lock: RangeLock): Plan =>
          this.mapPlan(
            ops,
            commit,
            () => {
              count();
              this.changeMap(start, end, false);
              this.afterBitsCleared();
            },
            () => this.locks.release(lock),
          );
        const lock = this.locks.tryAcquire('write', start, end);
        return lock ? withLock(lock) : this.locks.acquire('write', start, end).then(withLock);
      }
    }
  }

  /**
   * Ends snapshot writes that a queue thread ran into the change area by itself, to blocks not
   * all redirected yet (docs/serving.md, "What the fast path serves"): redirects them, as the
   * finish of the engine's own plan for each would, before they complete. The queue thread hands
   * over a wake-up's worth at once, so their journal records go out in one write. The fast path
   * holds each write in its count of requests in flight until then, so no state change comes
   * between its write and this. Returns, per write, null or why it cannot become part of the
   * master (the volume failed or closed, or the write is not one the fast path could have run):
   * that request must fail, and its blocks read as before. A write that failed (`ok` false)
   * redirects nothing and only counts.
   */
  finishFastRedirects(writes: readonly FastWrite[]): (CldError | null)[] {
    const bs = this.layout.blockSize;
    const results: (CldError | null)[] = [];
    const changes: MapChange[] = [];
    const refused = this.unusable();
    for (const w of writes) {
      const start = w.offset / bs;
      const end = start + w.length / bs;
      let error: CldError | null = null;
      if (!w.ok) {
        // Its write failed: nothing to redirect, and the request fails with that error.
      } else if (refused) error = refused;
      else if (this.sb.state !== 'snapshot' || !Number.isSafeInteger(start) || !Number.isSafeInteger(end) || start >= end || end > this.layout.blocks) {
        error = new CldError('EIO', `a fast-path write of ${w.length} bytes at ${w.offset} cannot be redirected in state ${this.sb.state}`);
      } else {
        // The mark before the redirect, so that every commit that captures one captures both.
        if (this.tracking?.needsMark(start, end)) this.tracking.mark(start, end);
        changes.push({ start, end, redirected: true });
      }
      if (!w.ok || error) this.counters.errors++;
      results.push(error);
    }
    try {
      this.changeMaps(changes);
    } catch (err) {
      const error = err instanceof CldError ? err : new CldError('EIO', `record the map changes of ${changes.length} writes: ${(err as Error).message}`, { cause: err });
      this.counters.errors += changes.length;
      return results.map((r, i) => (writes[i].ok && !r ? error : r));
    }
    for (const c of changes) {
      this.counters.writes++;
      this.counters.bytesWritten += (c.end - c.start) * bs;
    }
    return results;
  }

  /** finishFastRedirects for one write; throws when it cannot become part of the master. */
  finishFastRedirect(offset: number, length: number, ok: boolean): void {
    const [error] = this.finishFastRedirects([{ offset, length, ok }]);
    if (error) throw error;
  }

  /** A plan whose finish only does bookkeeping, so it may run after completion. */
  private simplePlan(ops: IoOp[], commit: boolean, onSuccess: () => void): Plan {
    let done = false;
    return {
      ops,
      orderedFinish: false,
      commit,
      finish: (ok: boolean) => {
        if (done) return;
        done = true;
        if (ok) onSuccess();
        else this.counters.errors++;
        this.leave(false);
      },
    };
  }

  /** A plan whose finish changes the map: it must run before the request completes. */
  private mapPlan(ops: IoOp[], commit: boolean, onSuccess: () => void, always?: () => void): Plan {
    let done = false;
    return {
      ops,
      orderedFinish: true,
      commit,
      finish: (ok: boolean) => {
        if (done) return;
        done = true;
        try {
          if (ok) onSuccess();
          else this.counters.errors++;
        } finally {
          // Before the request completes: a flush that follows it must find the map change.
          this.publishCommitPending();
          always?.();
          this.leave(false);
        }
      },
    };
  }

  /**
   * Sets or clears the redirect bits of [start, end), which the queue threads read while this
   * runs (docs/serving.md), in the order that keeps them safe:
   *   1. a flush now has something to commit: a fast flush issued after a fast write that the
   *      new bits made possible must not return before the bits are durable;
   *   2. the journal has the change: a fast write the new bits made possible may complete to the
   *      kernel at once, and a daemon killed then must find the change on restart;
   *   3. it is counted (publication's mapChanges), its data having completed before this runs:
   *      a flush's own fdatasync covers a commit's first one only when no change was counted
   *      after it began;
   *   4. only then the bits.
   */
  private changeMap(start: number, end: number, redirected: boolean): void {
    this.changeMaps([{ start, end, redirected }]);
  }

  /** changeMap for several changes, their journal records in one write. */
  private changeMaps(changes: readonly MapChange[]): void {
    if (changes.length === 0) return;
    this.withMapLock(() => {
      this.publication.setCommitPending(true);
      this.journal?.recordAll(changes);
      this.publication.countMapChange();
      for (const c of changes) this.map.assign(c.start, c.end, c.redirected);
    });
    if (this.journal && this.journal.pending >= JOURNAL_COMMIT_BYTES) this.commitForJournal();
  }

  /**
   * A writer that never flushes (a raw device, a virtual machine's disk image kept without
   * barriers) asks for no commit, so its journal held a record per first touch for the whole
   * snapshot: up to 24 bytes per block of the data area, in RAM, and read whole by the next
   * start. Past JOURNAL_COMMIT_BYTES of records no commit covers, the volume commits by itself,
   * once the request that crossed it is finished.
   */
  private commitForJournal(): void {
    if (this.journalCommit) return;
    this.journalCommit = true;
    queueMicrotask(() => {
      if (this.closed || this.failure) {
        this.journalCommit = false;
        return;
      }
      // A failed commit fails the volume (commitLoop), which every request then reports.
      this.commit()
        .catch(() => {})
        .finally(() => (this.journalCommit = false));
    });
  }

  private countRead(start: number, end: number): void {
    this.counters.reads++;
    this.counters.bytesRead += (end - start) * this.layout.blockSize;
  }

  private leave(merge: boolean): void {
    this.inFlight--;
    if (merge) this.mergesInFlight--;
    if (this.inFlight === 0 && this.drainWaiters.length) {
      const waiters = this.drainWaiters;
      this.drainWaiters = [];
      for (const w of waiters) w();
    }
  }

  private checkUsable(): void {
    const error = this.unusable();
    if (error) throw error;
  }

  /** Why the volume serves nothing any more (it failed or closed), or null. */
  private unusable(): CldError | null {
    return this.failure ?? (this.closed ? new CldError('CLDD_CLOSED', 'the volume is closed') : null);
  }

  // ---------------------------------------------------------------- resync merges

  /**
   * Picks the next window that starts with a redirected block and holds at most `maxBlocks` of
   * them, locks it against master writes, and returns every redirected run in it to copy, packed
   * one after another in the copy buffer. Null when there is nothing left to merge. A window
   * rather than one run: blocks redirected one by one (random 4 KiB writes) made one merge each,
   * and the resync ran at a twentieth of a dd copy. Counted in redirected blocks rather than
   * spanning `maxBlocks`: after random first touches a 4 MiB span held 2.4 MiB of them, and each
   * window costs the main thread its picking, its hand-off and its journal record whatever it
   * holds. The span stays within MERGE_SPAN_FACTOR times `maxBlocks`, which bounds the range a
   * master write may find locked.
   */
  async beginMerge(maxBlocks: number): Promise<Merge | null> {
    for (;;) {
      if (this.gate) await this.gate;
      this.checkUsable();
      if (this.sb.state !== 'resync') return null;
      if (this.map.count === 0) {
        this.setState('plain');
        return null;
      }
      let start = this.map.nextSet(this.mergeCursor);
      if (start < 0) start = this.map.nextSet(0);
      if (start < 0) return null;
      // The window ends after its last redirected block, so the lock is no larger than it needs
      // to be. In resync bits are only cleared, so once locked it holds at most that many.
      const most = Math.max(1, maxBlocks);
      const end = this.map.windowEnd(start, start + most * MERGE_SPAN_FACTOR, most);
      this.mergeCursor = end >= this.layout.blocks ? 0 : end;
      this.inFlight++;
      this.mergesInFlight++;
      const lock = await this.locks.acquire('merge', start, end);
      const { blockSize: bs, changeOffset, dataOffset } = this.layout;
      // Redirected runs are at least a clear block apart: at most one in every two blocks.
      const all = new Float64Array((Math.min(most, Math.floor((end - start + 1) / 2)) + 1) * 4);
      let used = 0;
      let blocks = 0;
      this.map.forEachRun(start, end, (s, e, redirected) => {
        if (!redirected) return;
        all[used] = changeOffset + s * bs;
        all[used + 1] = dataOffset + s * bs;
        all[used + 2] = (e - s) * bs;
        all[used + 3] = blocks * bs;
        used += 4;
        blocks += e - s;
      });
      if (used === 0) {
        this.locks.release(lock);
        this.leave(true);
        continue;
      }
      const runs = all.subarray(0, used);
      const opsOf = (kind: 'read' | 'write', at: 0 | 1): IoOp[] => {
        const ops: IoOp[] = [];
        for (let i = 0; i < runs.length; i += 4) ops.push({ kind, offset: runs[i + at], length: runs[i + 2], bufferOffset: runs[i + 3] });
        return ops;
      };
      let reads: IoOp[] | null = null;
      let writes: IoOp[] | null = null;
      let done = false;
      return {
        start,
        end,
        blocks,
        runs,
        get reads() {
          return (reads ??= opsOf('read', 0));
        },
        get writes() {
          return (writes ??= opsOf('write', 1));
        },
        bufferLength: blocks * bs,
        finish: (ok: boolean) => {
          if (done) return;
          done = true;
          try {
            if (ok) {
              // One change for the whole window, one journal record: its bits not in `runs` are
              // clear already and stay so (in resync bits are only cleared, and the window's
              // lock keeps writes out), and a journal record is an assignment. A record per run
              // was one write to tmpfs each: about 250 per 4 MiB window after random 4 KiB
              // first touches.
              this.changeMap(start, end, false);
              this.counters.mergedBlocks += blocks;
              this.afterBitsCleared();
            } else {
              this.counters.errors++;
            }
          } finally {
            this.publishCommitPending();
            this.locks.release(lock);
            this.leave(true);
          }
        },
      };
    }
  }

  /** Resolves once the volume is plain (a resync finished). */
  untilPlain(): Promise<void> {
    if (this.sb.state === 'plain') return Promise.resolve();
    if (this.failure) return Promise.reject(this.failure);
    if (this.closed) return Promise.reject(new CldError('CLDD_CLOSED', 'the volume was closed'));
    return new Promise((resolve, reject) => this.plainWaiters.push({ resolve, reject }));
  }

  private afterBitsCleared(): void {
    if (this.sb.state === 'resync' && this.map.count === 0) this.setState('plain');
  }

  private setState(state: VolumeState): void {
    this.sb = { ...this.sb, state, stateChangedAt: this.now(), epoch: state === 'snapshot' ? this.sb.epoch + 1 : this.sb.epoch };
    this.sbDirty = true;
    // A snapshot ends the tracking period; enable calls this under its gate, after the commit
    // that made every mark durable, and the new period's set needs no write (format.md).
    if (state === 'snapshot') this.tracking?.startPeriod(this.sb.epoch);
    this.publishCommitPending();
    this.publication.setState(state);
    if (state === 'plain') {
      this.map.releaseIfEmpty();
      const waiters = this.plainWaiters;
      this.plainWaiters = [];
      for (const w of waiters) w.resolve();
    }
  }

  // ---------------------------------------------------------------- state changes

  /** Why enable() would refuse now (already enabled; a resync running and no wait), or null. */
  enableRefusal(options: { wait?: boolean } = {}): CldError | null {
    if (this.sb.state === 'snapshot') return new CldError('CLDD_STATE', `the slave is already enabled (snapshot ${this.sb.epoch})`);
    if (this.sb.state === 'resync' && !options.wait) {
      return new CldError('CLDD_STATE', `a resync is still running (${this.map.count} blocks left): wait for it to finish, or enable with --wait`);
    }
    return null;
  }

  /**
   * Takes the snapshot: from now on the data area is the slave image. Durable before it
   * returns. From resync it waits for the merge to finish when `wait` is set, else refuses.
   */
  async enable(options: { wait?: boolean } = {}): Promise<void> {
    this.checkUsable();
    this.beginTransition();
    try {
      const refused = this.enableRefusal(options);
      if (refused) throw refused;
      if (this.sb.state === 'resync') await this.untilPlain();
      await this.withGateClosed('enable', async () => {
        await this.commit();
        this.setState('snapshot');
        await this.commit();
      });
    } finally {
      this.transitioning = false;
    }
  }

  /** Drops the slave and starts the resync (or goes straight to plain when nothing was written). */
  async disable(): Promise<void> {
    this.checkUsable();
    this.beginTransition();
    try {
      if (this.sb.state !== 'snapshot') {
        throw new CldError('CLDD_STATE', `the slave is not enabled (the state is ${this.sb.state})`);
      }
      await this.withGateClosed('disable', async () => {
        // One commit, not enable's two: nothing is in flight, and it writes the map as it stands
        // before the superblock that says resync (docs/format.md, "Commits"), so a crash inside
        // it leaves the snapshot with its map either side of the commit, as a crash inside any
        // commit does. The first commit's fdatasync was a second one in a row here.
        this.setState(this.map.count === 0 ? 'plain' : 'resync');
        await this.commit();
      });
    } finally {
      this.transitioning = false;
    }
  }

  private beginTransition(): void {
    if (this.transitioning) throw new CldError('CLDD_STATE', 'another state change is in progress');
    this.transitioning = true;
  }

  /** Holds new requests, waits for those in flight, runs `fn`, lets the held requests go. */
  private async withGateClosed(what: string, fn: () => Promise<void>): Promise<void> {
    let open!: () => void;
    this.gate = new Promise<void>((resolve) => (open = resolve));
    // Requests the queue threads would serve now come to plan() and wait at the gate; those they
    // serve already must finish first, as those planned here do.
    this.publication.suspend();
    try {
      if (this.fastServers.size) await Promise.all([...this.fastServers].map((s) => s.idle()));
      // What the threads redirected before they went idle: a state change reads the map's count.
      this.takeRedirects();
      if (this.inFlight > 0) await this.drain(what);
      await fn();
    } finally {
      this.gate = null;
      // Whether a flush's queue thread may commit is told at a release, and the last one was
      // made with the gate closed: without this one, the first flush after it went to the engine.
      if (!this.failure && !this.closed) this.withMapLock(() => {});
      this.publication.resume();
      open();
    }
  }

  /**
   * Waits until no request is in flight. A request whose backing I/O never completes would hold
   * the state change, and every request held at its gate, forever: past drainLimitMs it gives
   * up (the gate opens again) and says what is still in flight.
   */
  private async drain(what: string): Promise<void> {
    let done!: () => void;
    const drained = new Promise<void>((resolve) => (done = resolve));
    this.drainWaiters.push(done);
    await within(drained, this.drainLimitMs, () => {
      this.drainWaiters = this.drainWaiters.filter((w) => w !== done);
      const held = [...this.fastServers].map((s) => s.describeRequests()).filter((d) => d !== '');
      return new CldError(
        'ETIMEDOUT',
        `${what}: ${this.inFlight} request(s) in flight did not finish within ${this.drainLimitMs / 1000} s${held.length ? ` (${held.join('; ')})` : ''}; nothing was changed`,
      );
    });
  }

  /** Waits for every request in flight to finish, commits, and refuses further requests. */
  async close(): Promise<void> {
    if (this.closed) return;
    if (!this.failure) {
      await this.withGateClosed('close', async () => {
        await this.commit();
      });
    }
    this.closed = true;
    this.publication.stop();
    // Everything is committed after a clean close; after a failure the journal must stay. No
    // thread appends to it any more (closed: they may not).
    this.withMapLock(() => {
      this.journal?.close(!this.failure);
      this.journal = null;
    }, false);
    const waiters = this.plainWaiters;
    this.plainWaiters = [];
    for (const w of waiters) w.reject(new CldError('CLDD_CLOSED', 'the volume was closed'));
  }

  // ---------------------------------------------------------------- commit

  /**
   * Makes every write that completed before the call durable, with the map changes they made.
   * Concurrent calls share commits (group commit); a call made during a commit waits for the next.
   * What a commit writes, in which order, and why a crash at any point of it is safe:
   * commit.ts and docs/format.md. The steps go to the store in one call (inOrder): a native store
   * runs them one after another on a worker thread, instead of a round trip through the event
   * loop each.
   *
   * A commit only writes waiting for their chunks' marks asked for (`marksOnly`), which writes
   * no redirect page and changes no state, skips the first flush: marks order nothing after
   * data, and those writes are not issued yet. That is one fdatasync of three for each first
   * write to a chunk in place in a tracking period.
   *
   * `run`, when given, may take the steps instead (a flush's own queue thread runs them and then
   * completes the flush: docs/serving.md); it returns null to leave them to the store. A commit
   * serving several callers uses the first caller's.
   */
  commit(run?: StepRunner): Promise<void> {
    return this.queueCommit(false, run);
  }

  private queueCommit(marksOnly: boolean, run?: StepRunner): Promise<void> {
    if (this.failure) return Promise.reject(this.failure);
    return new Promise((resolve, reject) => {
      this.commitWaiters.push({ resolve, reject, marksOnly, run });
      if (!this.commitRunning) void this.commitLoop();
    });
  }

  private async commitLoop(): Promise<void> {
    this.commitRunning = true;
    this.publishCommitPending();
    try {
      while (this.commitWaiters.length) {
        const batch = this.commitWaiters;
        this.commitWaiters = [];
        try {
          if (this.failure) throw this.failure;
          await this.commitOnce(batch.every((w) => w.marksOnly), batch.find((w) => w.run)?.run, batch.length === 1 && batch[0].run !== undefined);
          for (const w of batch) w.resolve();
        } catch (err) {
          this.fail(err);
          for (const w of batch) w.reject(this.failure ?? (err as Error));
        }
      }
    } finally {
      this.commitRunning = false;
      this.publishCommitPending();
    }
  }

  /** `alone`: one flush asked for this commit, and its queue thread may run it (`run`). */
  private async commitOnce(marksOnly: boolean, run?: StepRunner, alone = false): Promise<void> {
    await this.waitForNativeCommit();
    // Capture: the map as it is now reflects exactly the writes that have completed; the
    // tracking pages hold every mark made so far (writes waiting for them are not yet issued).
    // Under the map lock up to the writer's first step: it encodes the pages before it, and a
    // bit a queue thread set meanwhile would be in them without its chunk's mark.
    const { written, journalMark, marks } = this.withMapLock(() => {
      // A queue thread's commit that failed, taken in this hold, held changes this one will not
      // find dirty: no caller of this commit may be told they are durable.
      if (this.failure) throw this.failure;
      const redirectPages = this.map.takeDirty();
      const marks = this.tracking?.capture() ?? NO_MARKS;
      const bothCopies = this.sbDirty;
      this.sbDirty = false;
      const journalMark = this.journal?.mark();
      // Commits run back to back while flushes keep coming (a FUA write each, as ext4's journal
      // commits are): with "a commit runs" alone, every flush went through the engine as long as
      // the stream lasted, though those commits wrote no map.
      this.runningWritesMap = redirectPages.length > 0 || bothCopies;
      this.publishCommitPending();
      // Read under the lock, where no thread changes the map: the count of what the pages hold.
      const syncCoveredAt = alone ? this.publication.mapChanges : undefined;
      const capture = { sb: this.sb, bothCopies, marksOnly, redirectPages, redirectPayload: (p: number) => this.map.payload(p), marks, syncCoveredAt };
      return { written: this.writer.write(capture, run), journalMark, marks };
    });
    const done = await written;
    if (done) this.sb = { ...this.sb, ...done };
    // The trim may rename a new journal over the old: no thread may append meanwhile.
    if (journalMark !== undefined) this.withMapLock(() => this.journal?.trim(journalMark, this.sb.epoch));
    this.tracking?.committed(marks);
    this.counters.commits++;
  }

  /**
   * A failed commit leaves the durable state unknown between two valid versions; the volume
   * stops taking requests (as dm-thin does) until it is reopened, which recovers it.
   */
  private fail(err: unknown): void {
    if (this.failure) return;
    this.publication.stop();
    const detail = err instanceof Error ? err.message : String(err);
    this.failure = new CldError('EIO', `metadata commit failed (${detail}); the volume stopped taking I/O until it is reopened`, {
      cause: err,
    });
    const waiters = this.plainWaiters;
    this.plainWaiters = [];
    for (const w of waiters) w.reject(this.failure);
  }
}

function addCounters(sum: VolumeCounters, fast: FastPathCounters): VolumeCounters {
  sum.reads += fast.reads;
  sum.writes += fast.writes;
  sum.flushes += fast.flushes;
  sum.bytesRead += fast.bytesRead;
  sum.bytesWritten += fast.bytesWritten;
  sum.errors += fast.errors;
  sum.fastPath += fast.reads + fast.writes + fast.flushes + fast.errors;
  sum.pollsCaught += fast.pollsCaught;
  sum.pollsRanOut += fast.pollsRanOut;
  return sum;
}
