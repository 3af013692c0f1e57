/**
 * One ublk device serving one target ('master' or 'slave') of a Volume. The native Device runs
 * one thread per queue (native/device.h); this class is the batched bridge to the engine for the
 * requests those threads do not serve themselves:
 *
 *   - a request whose plan is a pure function of what the engine publishes (reads, plain writes,
 *     writes to blocks already redirected, flushes with nothing to commit) is served by its queue
 *     thread without JS (the fast path, docs/serving.md); this class registers the device with
 *     the volume, which turns that path off and waits for it to drain around state changes;
 *   - a first touch in a snapshot is written and redirected by its queue thread too (the
 *     volume's MapRedirector, native/redirector.h); only when that thread may not redirect it
 *     does it come here, once, after its write, for the volume to redirect its blocks
 *     (finishFastRedirects) before it completes;
 *   - every other request a queue's thread hands over is planned here (volume.plan), and the
 *     plans' extents go back to the native side in one submit() per queue and turn of the event
 *     loop;
 *   - a plan without ordering needs is completed to the kernel by the queue thread as soon as its
 *     extents are done; its finish(ok) runs afterwards, batched with the next events;
 *   - a plan with orderedFinish or commit comes back once, after its extents: finish(ok), then
 *     volume.commit() when asked, then complete().
 *
 * Why threads now: with the rings on the main thread (uv_poll, every request planned in JS) the
 * VM measured 4 KiB random reads at QD1 at a third of the reference C server's rate, and an
 * earlier thread-per-queue model that still planned every request in JS was slower than that
 * (commit 1b81199: two cross-thread wake-ups per batch). What pays is keeping the main thread off
 * the path of ordinary requests altogether: see docs/benchmarks.md for the figures.
 */
import { constants as osConstants } from 'node:os';
import { within } from '../deadline.js';
import { CldError, asCldError, errnoOf } from '../errors.js';
import type { Plan, Request, RequestOp, Target } from '../engine/plan.js';
import type { Volume } from '../engine/volume.js';
import { type OrderedStep, type StepRunner, packSteps, writtenBytes } from '../io/block-store.js';
import { addon } from '../native/addon.js';
import { allowedCpus, servingCpus } from './affinity.js';
import { hasZeroCopy, type DeviceInfo, type UblkControl } from './control.js';
import type { NativeDeviceOptions } from '../native/native.js';
import { IO_OP, UBLK_ATTR, UBLK_F } from './uapi.js';
import type { FastPathCounters, FastPathServer, FastWrite } from '../engine/publication.js';
import type { NativeDeviceHandle, NativePublication, NativeQueueState, NativeRedirector } from '../native/native.js';
import { COMMIT_STEP_KINDS, EVENTS, EXTENT_KIND, REQUEST_FLAGS, SUBMIT_FLAGS, TAG_STATE, TAG_STATE_NAMES } from '../native/wire.js';

/** The engine's name of each request opcode it serves. */
const REQUEST_OPS: Record<number, RequestOp> = IO_OP;
/**
 * Room for the images of a commit that a queue thread runs, the engine's (runOnQueue) or its own
 * (for a flush or a FUA write): 16 pages of 4 KiB. A first touch's flush writes a map page, a tracking page and the superblock; a commit
 * larger than this goes through the store.
 */
const META_BYTES = 64 << 10;

/** The control commands a device uses (UblkControl's; tests drive a device with their own). */
export type DeviceControl = Pick<UblkControl, 'add' | 'setParams' | 'start' | 'stop' | 'delete' | 'info' | 'startRecovery' | 'endRecovery' | 'queueAffinity'>;

/** Opens the native side of a device: the addon's Device, unless a test gives its own queues. */
export type NativeDeviceFactory = (options: NativeDeviceOptions) => NativeDeviceHandle;
const addonDevice: NativeDeviceFactory = (options) => new (addon().Device)(options);

/** What create() and recover() take besides the device's geometry. */
export interface DeviceSeams {
  /** The native side (default: the addon's). */
  native?: NativeDeviceFactory;
  /** How long START_DEV / END_USER_RECOVERY and STOP_DEV may take (defaults below). */
  startBoundMs?: number;
  stopBoundMs?: number;
}

export interface QueueOptions {
  queues: number;
  depth: number;
  /** Largest request, bytes; the kernel rounds it down to a page. */
  bufferBytes: number;
  /** Largest discard / write-zeroes request, bytes. */
  maxDiscardBytes: number;
  /** How long a queue thread polls for work before it sleeps, µs (native.d.ts); absent or 0: never. */
  pollMicros?: number;
}

export const DEFAULT_QUEUE_OPTIONS: QueueOptions = {
  queues: 1,
  depth: 64,
  // 1 MiB, like loop's 1280 KiB: a 1 MiB request is not split in two. Splitting cost more than
  // the second round trip: a profile showed fio's 1 MiB O_DIRECT requests, which the block layer
  // had to split, going through an io_uring worker of fio's (gone with 1 MiB requests). In
  // one VM run against 512 KiB, 1 MiB sequential writes went 627-788 -> 1015-1394 MiB/s with
  // zero copy (7.3) and 292-336 -> 392-412 MiB/s copying (6.12); reads +20-70%. Where the kernel
  // copies (no user copy, before 6.5), the tag buffers this touches cost up to depth x 1 MiB of
  // memory per queue; with user copy but not zero copy the threads copy requests themselves
  // through small buffers (native/device.cc).
  bufferBytes: 1 << 20,
  maxDiscardBytes: 256 << 20,
};

/** Numbers appended to a typed array that is reused from call to call (and grows as needed). */
class Batch<T extends Float64Array | Int32Array> {
  length = 0;
  constructor(public array: T) {}

  /** Makes room for `n` more numbers and returns the array to write them into, from `length` on. */
  reserve(n: number): T {
    if (this.length + n > this.array.length) {
      const grown = new (this.array.constructor as new (size: number) => T)(Math.max(2 * this.array.length, this.length + n));
      grown.set(this.array.subarray(0, this.length));
      this.array = grown;
    }
    return this.array;
  }
}

/** Where the daemon holds a request, per tag (for outstanding() and the stall watchdog). */
const STAGE = { none: 0, planning: 1, running: 2, commit: 3 } as const;
const STAGE_NAMES = ['', 'its plan (a state change or a merge of its blocks holds it)', 'its backing I/O or the engine finishing it', 'the map commit'];
/** How outstanding() names a request the engine never planned. */
const FAST_OP = 'fast-path request';
/** How long a state change waits for the fast path's requests in flight before it gives up. */
const FAST_DRAIN_MS = 30_000;
/**
 * How long START_DEV and END_USER_RECOVERY may take. The kernel holds them until every tag of
 * every queue has a fetch (and START_DEV, before 6.19, until the partition scan the queues serve
 * is done), without a bound: a queue that never fetched would hold the daemon there forever.
 * START_DEV took 27-47 ms in the TCG VMs (6.12 and 7.3, test/fixtures/ublk-bounds.mjs):
 * the bound leaves room for a slow backing store under the partition scan; a queue that reports
 * a failure (the kernel refused its fetches: 66-91 ms there) ends the wait at once.
 */
const START_BOUND_MS = 30_000;
/** How often the wait above looks at the queues. */
const START_POLL_MS = 50;
/** How long a cancelled START_DEV or END_USER_RECOVERY, or a DEL_DEV, may take. */
const CANCEL_BOUND_MS = 10_000;
/**
 * How long STOP_DEV may take: the kernel completes every request in flight first, each a
 * backing I/O (the daemon's own watchdog reports one outstanding for 30 s as stalled).
 */
const STOP_BOUND_MS = 60_000;

/** A request the device has not completed yet, as `outstanding()` reports it. */
export interface OutstandingRequest {
  queue: number;
  tag: number;
  op: string;
  offset: number;
  length: number;
  ageMs: number;
  /** Where the daemon has it. */
  stage: string;
  /** The engine's plan for it: its backing extents and what it needs after them; null before planning. */
  plan: string | null;
  /** Where the addon has the tag. */
  native: string;
}

/** Reports requests outstanding longer than `stallMs`, each once. */
export interface StallWatch {
  stallMs: number;
  report(message: string): void;
  /**
   * An error a queue thread reported (the addon's last error), with how many tags each queue
   * took out of service: a tag whose command the kernel refused (the device serves with
   * fewer), or an fdatasync of the backing file that failed (every later flush fails).
   */
  outOfService(message: string): void;
}

interface QueueBridge {
  plans: (Plan | undefined)[];
  stage: Uint8Array;
  /** performance.now() when the request arrived; the op, offset and length it asked for. */
  since: Float64Array;
  op: Uint8Array;
  offset: Float64Array;
  length: Float64Array;
  /** The `since` of the request last reported as stalled on this tag. */
  reported: Float64Array;
  submits: Batch<Float64Array>;
  completes: Batch<Int32Array>;
  flushQueued: boolean;
  stopped: boolean;
}

export class UblkDevice {
  readonly path: string;
  private native: NativeDeviceHandle | null = null;
  private readonly bridges: QueueBridge[];
  /** Where the native side writes each delivery (see QueueEventHandler). */
  private readonly events: Float64Array;
  private stopping: Promise<void> | null = null;
  private stopBoundMs = STOP_BOUND_MS;
  /** The last native error the watchdog reported. */
  private reportedError: string | null = null;
  private nativeFactory: NativeDeviceFactory = addonDevice;
  private pollMicros = 0;
  private detachFastPath: (() => void) | null = null;
  private detachRedirector: (() => void) | null = null;
  private watchdog: NodeJS.Timeout | null = null;
  /** The images of the commit a queue thread is running (runOnQueue, or the thread's own). */
  private readonly meta: Uint8Array | null;
  private allStopped!: () => void;
  private readonly stoppedPromise: Promise<void>;

  private constructor(
    private readonly control: DeviceControl,
    private readonly volume: Volume,
    readonly target: Target,
    readonly info: DeviceInfo,
  ) {
    this.path = `/dev/ublkb${info.id}`;
    this.bridges = Array.from({ length: info.queues }, () => ({
      plans: new Array<Plan | undefined>(info.depth),
      stage: new Uint8Array(info.depth),
      since: new Float64Array(info.depth),
      op: new Uint8Array(info.depth),
      offset: new Float64Array(info.depth),
      length: new Float64Array(info.depth),
      reported: new Float64Array(info.depth),
      submits: new Batch(new Float64Array(64 * info.depth)),
      completes: new Batch(new Int32Array(2 * info.depth)),
      flushQueued: false,
      stopped: false,
    }));
    this.events = new Float64Array(EVENTS.perTag * info.depth);
    // Only the master's flushes commit.
    this.meta = target === 'master' ? new Uint8Array(META_BYTES) : null;
    this.stoppedPromise = new Promise((resolve) => (this.allStopped = resolve));
  }

  get id(): number {
    return this.info.id;
  }

  /**
   * Adds a device for `target`, sets its parameters, starts serving and returns once the kernel
   * has started it (the partition scan is served by then). On failure the device is deleted.
   */
  static async create(
    control: DeviceControl,
    volume: Volume,
    backingFd: number,
    target: Target,
    options: QueueOptions & DeviceSeams & { id?: number; flags: number },
  ): Promise<UblkDevice> {
    const info = await control.add({ id: options.id, queues: options.queues, depth: options.depth, bufferBytes: options.bufferBytes, flags: options.flags });
    const device = new UblkDevice(control, volume, target, info);
    device.stopBoundMs = options.stopBoundMs ?? STOP_BOUND_MS;
    device.nativeFactory = options.native ?? addonDevice;
    device.pollMicros = options.pollMicros ?? 0;
    try {
      // The encoding is whatever the kernel kept; recovery must not be lost silently.
      const missing = options.flags & ~info.flags & (UBLK_F.USER_RECOVERY | UBLK_F.USER_RECOVERY_REISSUE);
      if (missing) throw new CldError('EOPNOTSUPP', `ublk device ${info.id}: the kernel dropped the flags ${missing.toString(16)} it was asked for`);
      await control.setParams(info.id, {
        capacity: volume.capacity,
        blockSize: volume.blockSize,
        attrs: target === 'master' ? UBLK_ATTR.VOLATILE_CACHE | UBLK_ATTR.FUA : UBLK_ATTR.READ_ONLY,
        maxIoBytes: info.bufferBytes,
        maxDiscardBytes: target === 'master' ? options.maxDiscardBytes : 0,
      });
      await device.open(backingFd);
      // START_DEV waits for the fetches issued above and reads the partition table through the
      // queues: it runs in the kernel's io_uring worker while this thread serves.
      await device.untilServing('START_DEV', (signal) => control.start(info.id, signal), options.startBoundMs ?? START_BOUND_MS);
    } catch (err) {
      const left = await device.abandon();
      if (left) throw new CldError(asCldError(err).code, `${(err as Error).message}; ${left}`, { cause: err });
      throw err;
    }
    return device;
  }

  /**
   * Takes over a device whose server died (UBLK_F_USER_RECOVERY): its block device stayed and
   * its I/O waits; after END_USER_RECOVERY this process serves it.
   */
  static async recover(
    control: DeviceControl,
    volume: Volume,
    backingFd: number,
    target: Target,
    id: number,
    options: DeviceSeams & { pollMicros?: number } = {},
  ): Promise<UblkDevice> {
    let info = await control.info(id);
    if ((info.flags & UBLK_F.USER_RECOVERY) === 0) {
      throw new CldError('EINVAL', `ublk device ${id} was not created with user recovery; it cannot be taken over`);
    }
    // The kernel needs a moment to notice the old server is gone and quiesce the device.
    const deadline = Date.now() + 15_000;
    for (;;) {
      try {
        await control.startRecovery(id);
        break;
      } catch (err) {
        if ((err as CldError).code !== 'EBUSY' || Date.now() > deadline) {
          info = await control.info(id).catch(() => info);
          throw new CldError((err as CldError).code ?? 'EIO', `recover ublk device ${id} (state ${info.state}, server pid ${info.serverPid}): ${(err as Error).message}`, { cause: err });
        }
        await sleep(100);
      }
    }
    info = await control.info(id);
    const device = new UblkDevice(control, volume, target, info);
    device.stopBoundMs = options.stopBoundMs ?? STOP_BOUND_MS;
    device.nativeFactory = options.native ?? addonDevice;
    device.pollMicros = options.pollMicros ?? 0;
    await device.open(backingFd);
    try {
      await device.untilServing('END_USER_RECOVERY', (signal) => control.endRecovery(id, signal), options.startBoundMs ?? START_BOUND_MS);
    } catch (err) {
      // The device stays in the kernel, its I/O waiting, for the next daemon to take over.
      device.closeNative();
      throw err;
    }
    return device;
  }

  /**
   * Runs START_DEV or END_USER_RECOVERY (`run`), which the kernel holds until every tag has a
   * fetch, and cancels it when a queue reports a failure or after `boundMs`: the error says
   * which, and how far the queues got.
   */
  private async untilServing(command: string, run: (signal: AbortSignal) => Promise<void>, boundMs: number): Promise<void> {
    const label = `ublk ${command} of device ${this.info.id}`;
    const abort = new AbortController();
    const began = performance.now();
    let reason: { code: string; message: string } | null = null;
    let poll: NodeJS.Timeout | undefined;
    let cancelled: NodeJS.Timeout | undefined;
    const ran = run(abort.signal).then(
      () => null,
      (err: unknown) => err,
    );
    const gaveUp = new Promise<'stuck'>((resolve) => {
      poll = setInterval(() => {
        const failure = this.queueFailure();
        if (failure) reason = { code: 'EIO', message: `a queue failed before the device started: ${failure}` };
        else if (performance.now() - began > boundMs) reason = { code: 'ETIMEDOUT', message: `not done after ${boundMs / 1000} s` };
        if (!reason) return;
        clearInterval(poll);
        abort.abort();
        cancelled = setTimeout(() => resolve('stuck'), CANCEL_BOUND_MS);
      }, START_POLL_MS);
    });
    try {
      const outcome = await Promise.race([ran, gaveUp]);
      // Done after all (the cancel crossed the completion) and no queue failed: started.
      if (outcome === null && (reason as { code: string } | null)?.code === 'ETIMEDOUT') return;
      if (reason !== null) {
        const { code, message } = reason;
        const after = outcome === 'stuck' ? `; the kernel still held it ${CANCEL_BOUND_MS / 1000} s after it was cancelled` : '';
        throw new CldError(code, `${label}: ${message} (${this.fetchProgress()})${after}`, { cause: outcome ?? undefined });
      }
      if (outcome !== null) throw outcome;
    } finally {
      clearInterval(poll);
      clearTimeout(cancelled);
    }
  }

  /** Why a queue cannot serve (a failed ring, a tag out of service, a stopped thread), or null. */
  private queueFailure(): string | null {
    const native = this.native;
    if (!native) return 'the queues are closed';
    for (let q = 0; q < this.info.queues; q++) {
      const failure = this.inspectQueue(q)?.failure;
      if (failure) return `queue ${q}: ${failure}`;
    }
    if (native.lastError) return native.lastError;
    const stopped = this.bridges.findIndex((b) => b.stopped);
    return stopped >= 0 ? `queue ${stopped} stopped serving` : null;
  }

  /** How many tags of each queue the kernel has (a fetch, or a request in service), and dead. */
  private fetchProgress(): string {
    const parts: string[] = [];
    for (let q = 0; q < this.info.queues; q++) {
      const state = this.inspectQueue(q);
      if (!state) {
        parts.push(`queue ${q}: closed`);
        continue;
      }
      let fetching = 0;
      let serving = 0;
      let dead = 0;
      for (const s of state.states) {
        if (s === TAG_STATE.fetching) fetching++;
        else if (s === TAG_STATE.dead) dead++;
        else if (s !== TAG_STATE.idle) serving++;
      }
      parts.push(`queue ${q}: ${fetching} of ${this.info.depth} tags fetched, ${serving} serving a request, ${dead} out of service`);
    }
    return parts.join('; ');
  }

  /** The CPU each queue's thread is pinned to, -1 where none (src/ublk/affinity.ts). */
  cpus: number[] = [];

  private async open(backingFd: number): Promise<void> {
    // Unknown when the kernel does not answer: that queue's thread is not pinned.
    const masks = await Promise.all(Array.from({ length: this.info.queues }, (_, q) => this.control.queueAffinity(this.info.id, q).catch(() => null)));
    this.cpus = servingCpus(masks, allowedCpus(), this.info.id);
    const deadline = Date.now() + 5000;
    // The master's queue threads redirect the first touches they write in a snapshot themselves.
    const redirector = this.target === 'master' ? new (addon().Redirector)() : null;
    for (;;) {
      try {
        this.native = this.nativeFactory({
          devId: this.info.id,
          queues: this.info.queues,
          depth: this.info.depth,
          bufferBytes: this.info.bufferBytes,
          backingFd,
          ioctlEncode: (this.info.flags & UBLK_F.CMD_IOCTL_ENCODE) !== 0,
          zeroCopy: hasZeroCopy(this.info.flags),
          userCopy: (this.info.flags & UBLK_F.USER_COPY) !== 0,
          target: this.target,
          published: nativePublication(this.volume, redirector),
          onEvents: (q, requests, ordered, done, redirects, stopped) => this.onEvents(q, requests, ordered, done, redirects, stopped),
          events: this.events,
          meta: this.meta ?? undefined,
          cpus: this.cpus,
          pollMicros: this.pollMicros,
        });
        break;
      } catch (err) {
        // /dev/ublkcN appears through devtmpfs/udev shortly after ADD_DEV; a previous server's
        // ring may still hold it for a moment (EBUSY).
        const code = (err as { code?: string }).code;
        if ((code !== 'ENOENT' && code !== 'EBUSY') || Date.now() > deadline) throw asCldError(err);
        await sleep(20);
      }
    }
    const fastPath: FastPathServer = {
      idle: () => this.fastPathIdle(),
      counters: () => this.fastPathCounters(),
      describeRequests: () => {
        const held = this.outstanding();
        return held.length ? `${this.target} ${this.path}: ${describeRequests(held)}` : '';
      },
    };
    this.detachFastPath = this.volume.attachFastPath(fastPath);
    if (redirector) this.detachRedirector = this.volume.attachRedirector(redirector);
    this.native.start();
  }

  /**
   * Resolves once no request the queue threads serve by themselves is in flight (the volume has
   * turned that path off first). They are backing I/O of at most a request each, so this is
   * quick; a bound still names what it waited for.
   */
  private async fastPathIdle(): Promise<void> {
    const deadline = performance.now() + FAST_DRAIN_MS;
    for (let wait = 0; ; wait = Math.min(10, wait + 1)) {
      const native = this.native;
      if (!native || native.fastInFlight() === 0) return;
      if (performance.now() > deadline) {
        const fast = this.outstanding().filter((r) => r.op === FAST_OP);
        throw new CldError(
          'ETIMEDOUT',
          `${this.target} ${this.path}: ${native.fastInFlight()} request(s) served by the queue threads still in flight after ${FAST_DRAIN_MS / 1000} s ` +
            `(${fast.slice(0, 4).map((r) => `queue ${r.queue} tag ${r.tag}: ${r.op} of ${r.length} bytes at ${r.offset}`).join('; ') || 'none found'})`,
        );
      }
      await sleep(wait);
    }
  }

  /** What the queue threads served without the engine (the volume adds it to its counters). */
  private fastPathCounters(): FastPathCounters {
    // Only asked while attached: after the native device exists and before it is closed.
    const s = this.native?.stats() ?? new Float64Array(8);
    return { reads: s[0], writes: s[1], flushes: s[2], bytesRead: s[3], bytesWritten: s[4], errors: s[5], pollsCaught: s[6], pollsRanOut: s[7] };
  }

  private onEvents(q: number, requests: number, ordered: number, done: number, redirects: number, stopped: boolean): void {
    // First touches the queue threads redirected: the engine's bookkeeping (they completed).
    this.volume.takeRedirects();
    const ev = this.events;
    const depth = this.info.depth;
    const { requestFields } = EVENTS;
    const orderedAt = requestFields * depth;
    const doneAt = orderedAt + 2 * depth;
    for (let i = doneAt, end = i + 2 * done; i < end; i += 2) this.finishDone(q, ev[i], ev[i + 1]);
    for (let i = orderedAt, end = i + 2 * ordered; i < end; i += 2) this.finishOrdered(q, ev[i], ev[i + 1]);
    if (redirects) this.finishRedirects(q, doneAt + 2 * depth, redirects);
    for (let i = 0, end = requestFields * requests; i < end; i += requestFields) this.plan(q, ev[i], ev[i + 1], ev[i + 2], ev[i + 3], ev[i + 4]);
    this.flush(q);
    if (stopped) {
      this.bridges[q].stopped = true;
      if (this.bridges.every((b) => b.stopped)) this.allStopped();
    }
  }

  /** A request the native side completed to the kernel already: the engine's bookkeeping. */
  private finishDone(q: number, tag: number, errno: number): void {
    const bridge = this.bridges[q];
    const plan = bridge.plans[tag];
    bridge.plans[tag] = undefined;
    bridge.stage[tag] = STAGE.none;
    try {
      plan?.finish(errno === 0);
    } catch {
      // Already completed to the kernel; the engine's own accounting reports it.
    }
  }

  /**
   * Snapshot writes the queue thread ran into the change area by itself, as (tag, errno, offset,
   * length) records in the events buffer from `at`: the volume redirects their blocks (their
   * journal records in one write), and only then may they complete.
   */
  private finishRedirects(q: number, at: number, count: number): void {
    const ev = this.events;
    const writes: FastWrite[] = [];
    const fields = EVENTS.redirectFields;
    for (let i = at; i < at + fields * count; i += fields) writes.push({ offset: ev[i + 2], length: ev[i + 3], ok: ev[i + 1] === 0 });
    let results: (Error | null)[];
    try {
      results = this.volume.finishFastRedirects(writes);
    } catch (err) {
      results = writes.map(() => err as Error); // an engine bug fails these requests, not the server
    }
    for (let k = 0; k < count; k++) {
      const errno = ev[at + fields * k + 1];
      this.answer(q, ev[at + fields * k], errno !== 0 ? -errno : results[k] ? -errnoOf(results[k]) : 0);
    }
  }

  private plan(q: number, tag: number, opCode: number, flags: number, offset: number, length: number): void {
    const bridge = this.bridges[q];
    bridge.since[tag] = performance.now();
    bridge.op[tag] = opCode;
    bridge.offset[tag] = offset;
    bridge.length[tag] = length;
    const op = REQUEST_OPS[opCode];
    if (!op) {
      this.answer(q, tag, -osConstants.errno.EOPNOTSUPP);
      return;
    }
    const req: Request = { target: this.target, op, offset, length: op === 'flush' ? 0 : length, fua: (flags & REQUEST_FLAGS.fua) !== 0 };
    let planned: Plan | Promise<Plan>;
    try {
      planned = this.volume.plan(req);
    } catch (err) {
      this.answer(q, tag, -errnoOf(err));
      return;
    }
    if (planned instanceof Promise) {
      bridge.stage[tag] = STAGE.planning;
      planned.then(
        (plan) => this.execute(q, tag, plan),
        (err) => this.answer(q, tag, -errnoOf(err)),
      ).finally(() => this.scheduleFlush(q));
    } else {
      this.execute(q, tag, planned);
    }
  }

  private execute(q: number, tag: number, plan: Plan): void {
    if (!this.native) {
      // Planned after the queues closed (it waited for a lock or a state change): the kernel
      // will never see it complete, and the engine must not count it in flight forever.
      plan.finish(false);
      return;
    }
    try {
      this.executePlan(q, tag, plan);
    } catch (err) {
      // An engine bug must fail one request, not the server.
      this.bridges[q].plans[tag] = undefined;
      this.answer(q, tag, -errnoOf(err));
    }
  }

  private executePlan(q: number, tag: number, plan: Plan): void {
    const bridge = this.bridges[q];
    bridge.plans[tag] = plan;
    bridge.stage[tag] = STAGE.running;
    const needsEngine = plan.orderedFinish || plan.commit;
    if (plan.ops.length === 0) {
      // A flush: nothing to run here; its commit is the engine's.
      if (needsEngine) this.finishOrdered(q, tag, 0);
      else {
        bridge.plans[tag] = undefined;
        plan.finish(true);
        this.answer(q, tag, 0);
      }
      return;
    }
    const s = bridge.submits;
    const a = s.reserve(3 + 4 * plan.ops.length);
    let i = s.length;
    a[i++] = tag;
    a[i++] = needsEngine ? SUBMIT_FLAGS.needsEngine : 0;
    a[i++] = plan.ops.length;
    for (const op of plan.ops) {
      a[i++] = EXTENT_KIND[op.kind];
      a[i++] = op.offset;
      a[i++] = op.length;
      a[i++] = op.bufferOffset;
    }
    s.length = i;
  }

  private finishOrdered(q: number, tag: number, errno: number): void {
    const bridge = this.bridges[q];
    const plan = bridge.plans[tag];
    bridge.plans[tag] = undefined;
    if (!plan) {
      this.answer(q, tag, -osConstants.errno.EIO);
      return;
    }
    try {
      plan.finish(errno === 0);
    } catch (err) {
      this.answer(q, tag, -errnoOf(err));
      return;
    }
    if (errno !== 0) {
      this.answer(q, tag, -errno);
    } else if (plan.commit) {
      this.bridges[q].stage[tag] = STAGE.commit;
      // A flush (no I/O of its own) may run the commit's steps on its queue thread, which then
      // completes it: the commit is durable the moment they are done.
      let ran = false;
      const run: StepRunner | undefined =
        plan.ops.length === 0
          ? (steps) => {
              const running = this.runOnQueue(q, tag, steps);
              if (running) ran = true;
              return running;
            }
          : undefined;
      this.volume.commit(run).then(
        () => ran || this.answer(q, tag, 0),
        () => ran || this.answer(q, tag, -osConstants.errno.EIO),
      ).finally(() => this.scheduleFlush(q));
    } else {
      this.answer(q, tag, 0);
    }
  }

  /**
   * Hands a commit's steps to the queue thread of the flush `tag` is, as sync and meta extents
   * run one after another (native/device.cc); the thread completes the flush when they are done
   * and reports it as done (finishDone), which settles the promise. Null when this device cannot
   * (no native side, the slave, or images larger than the metadata buffer): the store runs them.
   */
  private runOnQueue(q: number, tag: number, steps: readonly OrderedStep[]): Promise<void> | null {
    const bridge = this.bridges[q];
    const meta = this.meta;
    if (!this.native || bridge.stopped || !meta || steps.length === 0 || writtenBytes(steps) > meta.length) return null;
    const s = bridge.submits;
    const a = s.reserve(3 + 4 * steps.length);
    a[s.length] = tag;
    a[s.length + 1] = SUBMIT_FLAGS.inOrder;
    a[s.length + 2] = steps.length;
    packSteps(steps, COMMIT_STEP_KINDS, a, s.length + 3, meta);
    s.length += 3 + 4 * steps.length;
    // Its stage stays "the map commit" (finishOrdered), which the queue thread now runs.
    const done = new Promise<void>((resolve, reject) => {
      bridge.plans[tag] = {
        ops: [],
        orderedFinish: false,
        commit: false,
        finish: (ok) => (ok ? resolve() : reject(new CldError('EIO', `the commit's ${steps.length} steps on queue ${q} (flush tag ${tag}) failed`))),
      };
    });
    this.scheduleFlush(q);
    return done;
  }

  private answer(q: number, tag: number, result: number): void {
    this.bridges[q].stage[tag] = STAGE.none;
    const c = this.bridges[q].completes;
    const a = c.reserve(2);
    a[c.length++] = tag;
    a[c.length++] = result;
  }

  private scheduleFlush(q: number): void {
    const bridge = this.bridges[q];
    if (bridge.flushQueued) return;
    bridge.flushQueued = true;
    queueMicrotask(() => {
      bridge.flushQueued = false;
      this.flush(q);
    });
  }

  private flush(q: number): void {
    const bridge = this.bridges[q];
    const native = this.native;
    if (!native) {
      bridge.submits.length = 0;
      bridge.completes.length = 0;
      return;
    }
    const s = bridge.submits;
    if (s.length) {
      const length = s.length;
      s.length = 0;
      try {
        native.submit(q, s.array, length);
      } catch {
        // The native side refused the batch before queueing any of it (a bad extent): fail
        // those requests rather than leave them hanging. Nothing appends to `s` meanwhile.
        const records = s.array.slice(0, length);
        for (let i = 0; i < records.length; i += 3 + 4 * records[i + 2]) {
          const plan = bridge.plans[records[i]];
          bridge.plans[records[i]] = undefined;
          plan?.finish(false);
          this.answer(q, records[i], -osConstants.errno.EIO);
        }
      }
    }
    const c = bridge.completes;
    if (c.length) {
      const length = c.length;
      c.length = 0;
      native.complete(q, c.array, length);
    }
  }

  /** The requests not completed yet (or completed but not yet told to the engine), oldest first. */
  outstanding(): OutstandingRequest[] {
    const now = performance.now();
    const out: OutstandingRequest[] = [];
    this.bridges.forEach((bridge, q) => {
      let native: NativeQueueState | null = null;
      // Requests the queue thread serves by itself: the engine never saw them, or sees them only
      // to redirect their blocks once they are written.
      const fast = this.inspectQueue(q);
      if (fast) {
        for (let tag = 0; tag < fast.states.length; tag++) {
          const state = fast.states[tag];
          const waiting = state === TAG_STATE.waiting;
          if ((state !== TAG_STATE.fast && !waiting) || bridge.stage[tag] !== STAGE.none) continue;
          out.push({
            queue: q,
            tag,
            op: FAST_OP,
            offset: -1,
            length: -1,
            ageMs: Math.round(fast.ages[tag]),
            stage: waiting ? 'the engine to redirect its blocks (written by the queue thread)' : 'its backing I/O on the queue thread',
            plan: null,
            native: TAG_STATE_NAMES[fast.states[tag]],
          });
        }
      }
      for (let tag = 0; tag < bridge.stage.length; tag++) {
        if (bridge.stage[tag] === STAGE.none) continue;
        native ??= fast;
        out.push({
          queue: q,
          tag,
          op: REQUEST_OPS[bridge.op[tag]] ?? `op ${bridge.op[tag]}`,
          offset: bridge.offset[tag],
          length: bridge.length[tag],
          ageMs: Math.round(now - bridge.since[tag]),
          stage: STAGE_NAMES[bridge.stage[tag]],
          plan: describePlan(bridge.plans[tag]),
          native: native ? (TAG_STATE_NAMES[native.states[tag]] ?? `state ${native.states[tag]}`) : 'closed',
        });
      }
    });
    return out.sort((a, b) => b.ageMs - a.ageMs);
  }

  private inspectQueue(q: number): NativeQueueState | null {
    try {
      return this.native?.inspect(q) ?? null;
    } catch {
      return null;
    }
  }

  /**
   * Reports every request outstanding longer than `watch.stallMs`, once each, with where the
   * daemon and the addon hold it and what the engine is doing: a server that hangs its users
   * must at least say where. Checks every stallMs / 4 (at most every 5 s).
   */
  watch(watch: StallWatch): void {
    if (this.watchdog) clearInterval(this.watchdog);
    this.watchdog = setInterval(() => {
      this.reportStalls(watch);
      this.reportOutOfService(watch);
    }, Math.min(5000, Math.max(100, watch.stallMs / 4)));
    this.watchdog.unref();
  }

  /** Says once, when it happens, what a queue thread reported, and how many tags each queue lost. */
  private reportOutOfService(watch: StallWatch): void {
    const error = this.native?.lastError ?? null;
    if (error === null || error === this.reportedError) return;
    this.reportedError = error;
    const lost = this.bridges.map((_, q) => {
      const states = this.inspectQueue(q)?.states ?? new Uint8Array(0);
      return `queue ${q}: ${states.filter((s) => s === TAG_STATE.dead).length} of ${this.info.depth} tags out of service`;
    });
    watch.outOfService(`${this.target} ${this.path}: ${error} (${lost.join('; ')})`);
  }

  private reportStalls(watch: StallWatch): void {
    const stalled = this.outstanding().filter((r) => r.ageMs >= watch.stallMs);
    const fresh = stalled.filter((r) => this.bridges[r.queue].reported[r.tag] !== this.bridges[r.queue].since[r.tag]);
    if (fresh.length === 0) return;
    for (const r of fresh) this.bridges[r.queue].reported[r.tag] = this.bridges[r.queue].since[r.tag];
    const queues = [...new Set(fresh.map((r) => r.queue))].map((q) => {
      const n = this.inspectQueue(q);
      return n
        ? `queue ${q} holds ${n.requests} new, ${n.ordered} finished, ${n.redirects} written to redirect and ${n.done} completed requests for the engine, ${n.backingInFlight} backing I/Os and ${n.fastInFlight} fast-path requests in flight${n.failure ? `; its thread stopped: ${n.failure}` : ''}`
        : `queue ${q} is closed`;
    });
    const v = this.volume.status();
    const shown = fresh.slice(0, 8).map(describeRequest);
    watch.report(
      `${this.target} ${this.path}: ${stalled.length} request(s) outstanding for more than ${(watch.stallMs / 1000).toFixed(0)} s: ` +
        `${shown.join('; ')}${fresh.length > shown.length ? `; and ${fresh.length - shown.length} more` : ''}. ` +
        `${queues.join('; ')}. Engine: ${v.state}, ${v.inFlight} requests in flight, ${v.dirtyMapPages} dirty map pages${v.failed ? `, failed: ${v.failed}` : ''}`,
    );
  }

  /**
   * Orderly stop: STOP_DEV while the queues still serve (the kernel drains what is in flight
   * and then aborts every fetch), close rings and mappings, DEL_DEV. Safe to call twice.
   */
  stop(): Promise<void> {
    this.stopping ??= (async () => {
      let failure: unknown = null;
      try {
        // The kernel waits for every request in flight first: one that never completes would
        // hold STOP_DEV forever.
        await within(this.control.stop(this.info.id), this.stopBoundMs, () => {
          const held = this.outstanding();
          return new CldError(
            'ETIMEDOUT',
            `${this.target} ${this.path}: STOP_DEV did not finish within ${this.stopBoundMs / 1000} s; the kernel waits for ${held.length} request(s)` +
              `${held.length ? `: ${describeRequests(held)}` : ''}`,
          );
        });
      } catch (err) {
        if ((err as CldError).code === 'ETIMEDOUT') {
          // A request still holds the kernel, and so the queue thread serving it: closing the
          // queues now would wait for that thread. The device stays as it is; stop can be retried.
          this.stopping = null;
          throw err;
        }
        failure = err;
      }
      if (!failure) await Promise.race([this.stoppedPromise, sleep(10_000)]);
      this.closeNative();
      failure ??= await this.deleteWithin();
      if (failure) throw asCldError(failure);
    })();
    return this.stopping;
  }

  /** Drops the queues without telling the kernel (as a crash would); the device stays. */
  detach(): void {
    this.closeNative();
  }

  /** Closes the queues and deletes the device; says what it could not do, or null. */
  private async abandon(): Promise<string | null> {
    this.closeNative();
    const failed = await this.deleteWithin();
    return failed && (failed.code === 'ETIMEDOUT' ? failed.message : `the device could not be deleted: ${failed.message}`);
  }

  /** DEL_DEV, bounded (it waits for every reference to /dev/ublkcN): its error, or null. */
  private async deleteWithin(): Promise<CldError | null> {
    try {
      await within(this.control.delete(this.info.id), CANCEL_BOUND_MS, () => new CldError('ETIMEDOUT', `DEL_DEV of ublk device ${this.info.id} did not finish within ${CANCEL_BOUND_MS / 1000} s`));
      return null;
    } catch (err) {
      return asCldError(err);
    }
  }

  private closeNative(): void {
    // The volume keeps what it served in its counters (detach reads them while native is open).
    this.detachFastPath?.();
    this.detachFastPath = null;
    if (this.watchdog) clearInterval(this.watchdog);
    this.watchdog = null;
    const native = this.native;
    this.native = null;
    const pending = native?.close();
    // Completed to the kernel but not yet told to the engine.
    if (pending) for (let i = 0; i < pending.length; i += 3) this.finishDone(pending[i], pending[i + 1], pending[i + 2]);
    // The threads are gone: the volume takes what they redirected.
    this.detachRedirector?.();
    this.detachRedirector = null;
    // Plans the kernel will never see completed: let the engine account for them.
    for (const bridge of this.bridges) {
      for (let tag = 0; tag < bridge.plans.length; tag++) {
        const plan = bridge.plans[tag];
        bridge.plans[tag] = undefined;
        plan?.finish(false);
      }
    }
  }
}

/** What the volume publishes for the queue threads, with its geometry, as the addon takes it. */
export function nativePublication(volume: Volume, redirector: NativeRedirector | null = null): NativePublication {
  const { dataOffset, changeOffset, blockSize, blocks } = volume.layout;
  const tracking = volume.tracking;
  return {
    words: volume.publication.words,
    bits: volume.map.bits,
    trackBits: tracking?.durableBits ?? null,
    chunkShift: tracking?.chunkShift ?? 0,
    dataOffset,
    changeOffset,
    blockSize,
    blocks,
    redirector,
  };
}

/** The oldest few of `held`, and how many more. */
function describeRequests(held: readonly OutstandingRequest[], shown = 4): string {
  return `${held.slice(0, shown).map(describeRequest).join('; ')}${held.length > shown ? `; and ${held.length - shown} more` : ''}`;
}

function describeRequest(r: OutstandingRequest): string {
  return (
    `queue ${r.queue} tag ${r.tag}: ${r.op} of ${r.length} bytes at ${r.offset}, ${(r.ageMs / 1000).toFixed(1)} s, ` +
    `waiting for ${r.stage} (plan: ${r.plan ?? 'none yet'}; addon: ${r.native})`
  );
}

function describePlan(plan: Plan | undefined): string | null {
  if (!plan) return null;
  const ops = plan.ops.map((op) => `${op.kind} ${op.length} at ${op.offset}`).join(', ') || 'no I/O';
  return `${ops}${plan.orderedFinish ? ', finish before completion' : ''}${plan.commit ? ', commit' : ''}`;
}

export const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));
