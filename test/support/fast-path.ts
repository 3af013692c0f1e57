/**
 * The queue threads' fast path (native/device.cc), run on a BlockStore so that the engine's tests
 * drive their workloads through it: the decision is the addon's own PlanFast (addon.planFast),
 * the I/O goes to the test's store, and the count of fast requests in flight goes up before the
 * decision and down after the I/O, as on a queue thread. It registers with the volume like a
 * device does, so every state change turns it off and waits for it (docs/serving.md). A first
 * touch in a snapshot is redirected as a master's queue thread does it: by the addon's
 * Redirector (native/redirector.cc), the engine taking it later, or, when that declines (or
 * `nativeRedirects` is false), by the engine's finishFastRedirect. A master flush with something
 * to commit first offers the redirector to commit the threads' redirects itself, as a queue
 * thread does (commitHere); a flush the engine commits for runs its own sync meanwhile and then
 * the commit's steps, as a queue thread does (flushThroughEngine).
 */
import { within } from '../../src/deadline.js';
import type { Executor, IoOp, Request } from '../../src/engine/plan.js';
import { serve, StoreExecutor } from './disk.js';
import { FAST_MODE, type FastPathCounters, PUBLISHED_WORD } from '../../src/engine/publication.js';
import type { Volume } from '../../src/engine/volume.js';
import { type BlockStore, inOrder, type OrderedStep, packSteps, writtenBytes } from '../../src/io/block-store.js';
import { COMMIT_STEP_KINDS, EXTENT_KIND } from '../../src/native/wire.js';
import { addon } from '../../src/native/addon.js';
import type { NativeRedirector } from '../../src/native/native.js';
import { nativePublication } from '../../src/ublk/device.js';

/** ublk's opcodes and FUA flag, as a request descriptor carries them. */
const UBLK_OP = { read: 0, write: 1, flush: 2, discard: 3, 'write-zeroes': 5 } as const;
const UBLK_IO_F_FUA = 1 << 13;

export class FastPath {
  private inFlight = 0;
  private idleWaiters: (() => void)[] = [];
  private readonly detach: () => void;
  readonly counters: FastPathCounters = { reads: 0, writes: 0, flushes: 0, bytesRead: 0, bytesWritten: 0, errors: 0, pollsCaught: 0, pollsRanOut: 0 };
  /** Requests it served, and requests it left to the engine. */
  served = 0;
  declined = 0;
  /** First touches the redirector took, and those the engine redirected. */
  redirectedHere = 0;
  redirectedByEngine = 0;
  private readonly redirector: NativeRedirector | null;
  private readonly detachRedirector: () => void;

  constructor(
    readonly volume: Volume,
    private readonly store: BlockStore,
    /** Called before the I/O of a served request runs (a scheduler may hold it there). */
    private readonly beforeIo: (what: string) => Promise<void> = () => Promise.resolve(),
    /** Runs its reads and writes (a test may watch them); flushes go to the store. */
    private readonly executor: Executor = new StoreExecutor(store),
    nativeRedirects = true,
    /** Whether a flush offers the redirector its commit (commitHere) before the engine. */
    private readonly nativeCommits = true,
  ) {
    this.detach = volume.attachFastPath({ idle: () => this.idle(), counters: () => ({ ...this.counters }), describeRequests: () => '' });
    this.redirector = nativeRedirects ? new (addon().Redirector)() : null;
    this.detachRedirector = this.redirector ? volume.attachRedirector(this.redirector) : () => {};
  }

  close(): void {
    this.detachRedirector();
    this.detach();
  }

  /**
   * Serves `req` when the fast path decides it and returns the promise of its completion; null
   * (nothing done) when the engine must decide it. The promise gives 'engine' when the fast path
   * began it but handed it to the engine after all (a FUA write whose redirect or commit the
   * redirector declined): the caller then serves it through the engine, from the start.
   */
  tryServe(req: Request, buffer: Uint8Array): Promise<'done' | 'engine'> | null {
    this.inFlight++;
    const opFlags = UBLK_OP[req.op] | (req.fua ? UBLK_IO_F_FUA : 0);
    const length = req.op === 'flush' ? 0 : req.length;
    // The device's publication names its redirector: a FUA write may then commit on its thread.
    const decided = addon().planFast(nativePublication(this.volume, this.nativeCommits ? this.redirector : null), req.target, opFlags, req.offset, length);
    if (!decided) {
      this.declined++;
      this.leave();
      return null;
    }
    this.served++;
    const records = decided.extents;
    if (decided.commit) return this.writeThenCommit(req, buffer, decided.redirect, records);
    return (async () => {
      let ok = false;
      try {
        await this.beforeIo(`fast ${req.op} of ${length} at ${req.offset}`);
        const ops: IoOp[] = [];
        let sync = false;
        for (let i = 0; i < records.length; i += 4) {
          const [kind, offset, len, at] = [records[i], records[i + 1], records[i + 2], records[i + 3]];
          if (kind === 0 || kind === 1) ops.push({ kind: kind === 0 ? 'read' : 'write', offset, length: len, bufferOffset: at });
          else if (kind === 3) sync = true;
          else throw new Error(`the fast path planned extent kind ${kind}`);
        }
        if (decided.inOrder) {
          // A FUA write: the write, then the flush that makes it durable.
          await this.executor.run(ops, buffer);
          if (sync) await this.store.flush();
        } else {
          await Promise.all([ops.length ? this.executor.run(ops, buffer) : undefined, sync ? this.store.flush() : undefined]);
        }
        ok = true;
      } finally {
        // A write to blocks not all redirected: the engine redirects them (and counts it) before
        // it completes, while it still counts as in flight here, as on a queue thread.
        if (decided.redirect) {
          try {
            if (ok && this.redirectHere(req)) this.count(req, ok);
            else {
              this.redirectedByEngine++;
              this.volume.finishFastRedirect(req.offset, req.length, ok);
            }
          } finally {
            this.leave();
          }
        } else {
          this.count(req, ok);
          this.leave();
        }
      }
      return 'done' as const;
    })();
  }

  /**
   * A FUA write in a snapshot with something to commit, as its queue thread serves it
   * (CommitAfterWrite in native/device.cc): its write, then, for a first touch, the redirector's
   * redirect of its blocks, then the redirector's commit; 'engine' when either declines, the
   * write having counted in flight until then. A write that failed ends as a fast write does.
   */
  private async writeThenCommit(req: Request, buffer: Uint8Array, redirect: boolean, records: Float64Array): Promise<'done' | 'engine'> {
    let wrote = false;
    let ok = false;
    let engine = false;
    try {
      await this.beforeIo(`fast FUA write of ${req.length} at ${req.offset}`);
      const ops: IoOp[] = [];
      for (let i = 0; i < records.length; i += 4) {
        if (records[i] !== EXTENT_KIND.write) throw new Error(`the fast path planned extent kind ${records[i]} for a FUA write it commits`);
        ops.push({ kind: 'write', offset: records[i + 1], length: records[i + 2], bufferOffset: records[i + 3] });
      }
      await this.executor.run(ops, buffer);
      wrote = true;
      if (redirect && !this.redirectHere(req)) engine = true;
      else if (!(await this.runCommit())) engine = true;
      else {
        this.fuaCommitsHere++;
        ok = true;
      }
    } finally {
      if (!wrote && redirect) {
        // Its write failed: the engine fails it (and counts it), as a first touch's failed write.
        try {
          this.redirectedByEngine++;
          this.volume.finishFastRedirect(req.offset, req.length, false);
        } finally {
          this.leave();
        }
      } else {
        if (!engine) this.count(req, ok);
        else this.toEngine++;
        this.leave();
      }
    }
    return engine ? 'engine' : 'done';
  }

  /**
   * A master flush the fast path left to the engine, as its queue thread serves it alone
   * (RunOwnSync in native/device.cc): the map-change count read, then its own flush of the
   * store, while the engine plans the flush and captures its commit; then the commit's steps,
   * once that flush is done, less each flush the addon's ownSyncCovers says it covers. On a
   * device the engine may capture before that flush begins or after it ended, with other
   * requests completing and being redirected meanwhile: every other flush here is planned only
   * once its own sync is done, so both orders run.
   */
  async flushThroughEngine(executor: Executor): Promise<void> {
    if (await this.commitHere()) return;
    const { words } = nativePublication(this.volume);
    let own: Promise<{ done: boolean; count: number }> = Promise.resolve({ done: false, count: 0 });
    if (Atomics.load(words, PUBLISHED_WORD.commitPending) !== 0) {
      const count = Atomics.load(words, PUBLISHED_WORD.mapChanges) >>> 0;
      own = (async () => {
        await this.beforeIo('a flush\'s own sync');
        await this.store.flush();
        this.ownSyncs++;
        return { done: true, count };
      })();
      // A failed one fails the flush below, as on a thread (Commit), and the test with it.
      own.catch(() => {});
    }
    const run = (steps: readonly OrderedStep[]): Promise<void> =>
      (async () => {
        const { done, count } = await own;
        const records = new Float64Array(4 * steps.length);
        packSteps(steps, COMMIT_STEP_KINDS, records, 0, new Uint8Array(writtenBytes(steps)));
        const kept = steps.filter((_, i) => !addon().ownSyncCovers(done, count, records, 4 * i));
        this.syncsLeftOut += steps.length - kept.length;
        await inOrder(this.store, kept);
      })();
    if (this.flushesThroughEngine++ % 2 === 1) await own;
    const req: Request = { target: 'master', op: 'flush', offset: 0, length: 0 };
    const planned = this.volume.plan(req);
    const plan = planned instanceof Promise ? await planned : planned;
    let ok = false;
    try {
      await executor.run(plan.ops, new Uint8Array(0));
      ok = true;
    } finally {
      plan.finish(ok);
    }
    if (plan.commit) await this.volume.commit(run);
    await own;
  }

  /** Flushes that ran their own sync, and commit steps those syncs made needless. */
  private flushesThroughEngine = 0;
  ownSyncs = 0;
  syncsLeftOut = 0;
  /** Map commits the redirector built (a queue thread's own), and those of them for a FUA write. */
  commitsHere = 0;
  fuaCommitsHere = 0;
  /** FUA writes it began and then handed to the engine (their redirect or commit declined). */
  toEngine = 0;
  /** The device's metadata buffer, where a queue thread's commit encodes its images. */
  private readonly meta = new Uint8Array(64 * 1024);

  /**
   * A master flush with something to commit, as its queue thread first tries it (ServeFast in
   * native/device.cc): the redirector captures the commit of the threads' redirects and its
   * steps run in order on the store (counted in flight, as a fast request), then commitDone.
   * False when it declines: the flush goes to the engine.
   */
  async commitHere(): Promise<boolean> {
    if (!this.redirector || !this.nativeCommits) return false;
    if (Atomics.load(this.volume.publication.words, PUBLISHED_WORD.commitPending) === 0) return false;
    this.inFlight++;
    try {
      return await this.runCommit();
    } finally {
      this.leave();
    }
  }

  /**
   * The redirector's capture of a commit and its steps, in order, then commitDone (StartCommit in
   * native/device.cc); false when it declines. The caller counts it in flight.
   */
  private async runCommit(): Promise<boolean> {
    if (!this.redirector || !this.nativeCommits) return false;
    const pub = nativePublication(this.volume, this.redirector);
    if (Atomics.load(pub.words, PUBLISHED_WORD.mode) !== FAST_MODE.snapshot) return false;
    const records = this.redirector.captureCommit(pub, this.meta);
    if (!records) return false;
    this.commitsHere++;
    const steps: OrderedStep[] = [];
    for (let i = 0; i < records.length; i += 4) {
      const [kind, offset, length, at] = [records[i], records[i + 1], records[i + 2], records[i + 3]];
      if (kind === EXTENT_KIND.sync) steps.push({ kind: 'flush' });
      else if (kind === EXTENT_KIND.meta) steps.push({ kind: 'write', offset, data: this.meta.slice(at, at + length) });
      else throw new Error(`a queue thread's commit planned extent kind ${kind}`);
    }
    let error = 0;
    try {
      await this.beforeIo('a queue thread\'s map commit');
      await inOrder(this.store, steps);
    } catch (err) {
      error = 5; // EIO: the flush fails, and the volume at its next hold
      throw err;
    } finally {
      // The engine waits for it: wake it, as the device does (a delivery calls takeRedirects).
      if (this.redirector.commitDone(pub, error)) queueMicrotask(() => this.volume.takeRedirects());
    }
    return true;
  }

  /** What the queue thread's RedirectHere does, for one write. */
  private redirectHere(req: Request): boolean {
    if (!this.redirector) return false;
    const bs = this.volume.layout.blockSize;
    const done = this.redirector.redirect(nativePublication(this.volume, this.redirector), Float64Array.of(req.offset / bs, (req.offset + req.length) / bs));
    if (done) this.redirectedHere++;
    return done;
  }

  private count(req: Request, ok: boolean): void {
    const c = this.counters;
    if (!ok) c.errors++;
    else if (req.op === 'read') (c.reads++, (c.bytesRead += req.length));
    else if (req.op === 'write') (c.writes++, (c.bytesWritten += req.length));
    else c.flushes++;
  }

  private leave(): void {
    if (--this.inFlight > 0) return;
    const waiters = this.idleWaiters;
    this.idleWaiters = [];
    for (const w of waiters) w();
  }

  /** As the device's, bounded: a fast request that never ends fails the state change waiting for it. */
  private idle(): Promise<void> {
    if (this.inFlight === 0) return Promise.resolve();
    return within(new Promise<void>((resolve) => this.idleWaiters.push(resolve)), 30_000, () => new Error(`${this.inFlight} fast-path request(s) still in flight after 30 s`));
  }
}

/** A Disk (test/support/disk.ts) whose requests take the fast path where it decides them. */
export class FastPathDisk {
  readonly fast: FastPath;
  private readonly executor: Executor;

  constructor(
    readonly volume: Volume,
    store: BlockStore,
    executor: Executor = new StoreExecutor(store),
    nativeRedirects = true,
    nativeCommits = true,
  ) {
    this.fast = new FastPath(volume, store, undefined, executor, nativeRedirects, nativeCommits);
    this.executor = executor;
  }

  private async run(req: Request, buffer: Uint8Array): Promise<void> {
    const served = this.fast.tryServe(req, buffer);
    if (served && (await served) === 'done') return;
    if (req.op === 'flush' && req.target === 'master') return this.fast.flushThroughEngine(this.executor);
    return serve(this.volume, this.executor, req, buffer);
  }

  async read(offset: number, length: number, target: 'master' | 'slave' = 'master'): Promise<Uint8Array> {
    const buffer = new Uint8Array(length);
    await this.run({ target, op: 'read', offset, length }, buffer);
    return buffer;
  }

  async write(offset: number, data: Uint8Array, options: { fua?: boolean } = {}): Promise<void> {
    await this.run({ target: 'master', op: 'write', offset, length: data.length, fua: options.fua }, data);
  }

  async discard(offset: number, length: number, op: 'discard' | 'write-zeroes' = 'discard'): Promise<void> {
    await this.run({ target: 'master', op, offset, length }, new Uint8Array(0));
  }

  async flush(): Promise<void> {
    await this.run({ target: 'master', op: 'flush', offset: 0, length: 0 }, new Uint8Array(0));
  }
}
