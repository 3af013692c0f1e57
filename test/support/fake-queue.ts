/**
 * A ublk device without a kernel: the control commands and the native queue (one) that
 * UblkDevice drives, played in the test process, so that device.ts runs on any machine. The
 * queue serves nothing by itself (no fast path): every request goes to the engine through the
 * events buffer, and its plans' extents run on a store here, as native/device.cc runs them on
 * the backing file: a plan without ordering needs is completed at once and reported as done; one
 * that needs the engine is reported as ordered and completed by the engine's complete(); a
 * commit's steps (inOrder) run one after another from the metadata buffer.
 */
import { within } from '../../src/deadline.js';
import { errnoOf } from '../../src/errors.js';
import type { BlockStore } from '../../src/io/block-store.js';
import type { NativeDeviceHandle, NativeDeviceOptions, NativeQueueState } from '../../src/native/native.js';
import { EVENTS, EXTENT_KIND, SUBMIT_FLAGS, TAG_STATE } from '../../src/native/wire.js';
import type { DeviceInfo } from '../../src/ublk/control.js';
import type { DeviceControl } from '../../src/ublk/device.js';
import { IO_OP, UBLK_F } from '../../src/ublk/uapi.js';

/** The kernel's side of one request: what it asked, and the result the server committed. */
export interface KernelRequest {
  tag: number;
  op: keyof typeof OPS;
  offset: number;
  /** The request's pages: the write's data, or where a read lands. */
  buffer: Uint8Array;
  /** The result the server committed; awaited, it fails after 10 s saying which request it was. */
  readonly result: Promise<number>;
}

/** How long a test waits for the device to complete a request. */
const COMPLETION_BOUND_MS = 10_000;

const OPS = { read: 0, write: 1, flush: 2, discard: 3, 'write-zeroes': 5 } as const satisfies Record<(typeof IO_OP)[keyof typeof IO_OP], number>;
const FUA = 1; // wire.ts REQUEST_FLAGS.fua

/**
 * The control commands, answered as the kernel would for a device that starts at once; STOP_DEV
 * aborts `queue`'s tags.
 */
export function fakeControl(queue: FakeQueue, info: Partial<DeviceInfo> = {}): DeviceControl & { calls: string[] } {
  const calls: string[] = [];
  const device: DeviceInfo = { id: 7, queues: 1, depth: 8, state: 'dead', bufferBytes: 1 << 20, serverPid: 0, flags: UBLK_F.USER_RECOVERY | UBLK_F.USER_COPY, ...info };
  return {
    calls,
    add: async (o) => (calls.push('ADD_DEV'), { ...device, queues: o.queues, depth: o.depth, flags: o.flags | UBLK_F.USER_COPY }),
    setParams: async () => void calls.push('SET_PARAMS'),
    start: async () => void calls.push('START_DEV'),
    stop: async () => {
      calls.push('STOP_DEV');
      queue.abort();
    },
    delete: async () => void calls.push('DEL_DEV'),
    info: async () => (calls.push('GET_DEV_INFO'), device),
    startRecovery: async () => void calls.push('START_USER_RECOVERY'),
    endRecovery: async () => void calls.push('END_USER_RECOVERY'),
    queueAffinity: async () => [0],
  };
}

export class FakeQueue implements Pick<NativeDeviceHandle, 'start' | 'submit' | 'complete' | 'inspect' | 'fastInFlight' | 'stats' | 'lastError' | 'close'> {
  lastError: string | null = null;
  /** Tags the kernel refused (out of service). */
  private readonly dead = new Set<number>();
  private options!: NativeDeviceOptions;
  private readonly waiting = new Map<number, { request: KernelRequest; settle: (result: number) => void }>();
  /** Entries for the next delivery to the device, as native/device.cc gathers them. */
  private requests: number[] = [];
  private ordered: number[] = [];
  private done: number[] = [];
  private delivery: Promise<void> | null = null;
  private closed = false;

  constructor(private readonly store: BlockStore) {}

  /** The factory UblkDevice.create takes (its `native` seam). */
  readonly open = (options: NativeDeviceOptions): NativeDeviceHandle => {
    this.options = options;
    return this as unknown as NativeDeviceHandle;
  };

  /** The kernel hands the server a request; it settles with the result the server commits. */
  request(op: KernelRequest['op'], offset: number, bufferOrLength: Uint8Array | number, options: { fua?: boolean } = {}): KernelRequest {
    const tag = this.freeTag();
    const buffer = typeof bufferOrLength === 'number' ? new Uint8Array(bufferOrLength) : bufferOrLength;
    let settle!: (result: number) => void;
    const committed = new Promise<number>((resolve) => (settle = resolve));
    const what = `${op} of ${buffer.length} bytes at ${offset} (tag ${tag})`;
    // Bounded only when awaited: a request a test leaves pending on purpose rejects nothing.
    const request: KernelRequest = {
      tag,
      op,
      offset,
      buffer,
      get result() {
        return within(committed, COMPLETION_BOUND_MS, () => new Error(`the device did not complete the ${what} within ${COMPLETION_BOUND_MS / 1000} s`));
      },
    };
    this.waiting.set(tag, { request, settle });
    const length = op === 'flush' ? 0 : buffer.length;
    this.requests.push(tag, OPS[op], options.fua ? FUA : 0, offset, length);
    this.deliver();
    return request;
  }

  start(): void {}

  submit(_queue: number, plans: Float64Array, length: number): void {
    for (let i = 0; i < length; ) {
      const tag = plans[i];
      const flags = plans[i + 1];
      const count = plans[i + 2];
      const extents: number[][] = [];
      for (let k = 0; k < count; k++) extents.push(Array.from(plans.subarray(i + 3 + 4 * k, i + 7 + 4 * k)));
      i += 3 + 4 * count;
      void this.run(tag, flags, extents);
    }
  }

  complete(_queue: number, results: Int32Array, length: number): void {
    for (let i = 0; i < length; i += 2) this.settle(results[i], results[i + 1]);
  }

  inspect(): NativeQueueState {
    const depth = this.options.depth;
    const states = new Uint8Array(depth).fill(TAG_STATE.fetching);
    for (const tag of this.waiting.keys()) states[tag] = TAG_STATE.engine;
    for (const tag of this.dead) states[tag] = TAG_STATE.dead;
    return { states, ages: new Float64Array(depth), requests: 0, ordered: 0, done: 0, redirects: 0, backingInFlight: 0, fastInFlight: 0, failure: null };
  }

  fastInFlight(): number {
    return 0;
  }

  stats(): Float64Array {
    return new Float64Array(6);
  }

  close(): Int32Array {
    this.closed = true;
    return new Int32Array(0);
  }

  /** How many commits' steps the queue ran for a flush (inOrder plans). */
  commitsRun = 0;

  /** The kernel aborts every tag (the device stopped): the queue reports it has stopped. */
  abort(): void {
    setImmediate(() => this.closed || this.options.onEvents(0, 0, 0, 0, 0, true));
  }

  /**
   * Resolves once what the queue has gathered so far has been delivered to the device, and what
   * the device did with it in promises (a plan's finish, the rest of a commit) has run: those
   * are microtasks, all run before the next turn of the event loop.
   */
  async delivered(): Promise<void> {
    while (this.delivery) await this.delivery;
    await new Promise((resolve) => setImmediate(resolve));
  }

  /** The kernel refused `tag`'s command: the queue takes it out of service, as device.cc does. */
  takeOutOfService(tag: number, why: string): void {
    this.dead.add(tag);
    this.lastError = why;
  }

  /** Requests the kernel still waits for. */
  get outstanding(): number {
    return this.waiting.size;
  }

  private freeTag(): number {
    for (let tag = 0; tag < this.options.depth; tag++) if (!this.waiting.has(tag) && !this.dead.has(tag)) return tag;
    throw new Error(`all ${this.options.depth} tags are in use`);
  }

  private async run(tag: number, flags: number, extents: number[][]): Promise<void> {
    const { request } = this.waiting.get(tag)!;
    let errno = 0;
    try {
      if (flags === SUBMIT_FLAGS.inOrder) {
        // A commit's steps from the metadata buffer, each after the one before; then the flush
        // completes.
        const meta = this.options.meta!;
        this.commitsRun++;
        for (const [kind, offset, length, at] of extents) {
          if (kind === EXTENT_KIND.sync) await this.store.flush();
          else await this.store.write(meta.subarray(at, at + length), offset);
        }
      } else {
        await Promise.all(
          extents.map(async ([kind, offset, length, at]) => {
            const view = request.buffer.subarray(at, at + length);
            if (kind === EXTENT_KIND.read) await this.store.read(view, offset);
            else if (kind === EXTENT_KIND.write) await this.store.write(view, offset);
            else if (kind === EXTENT_KIND.zero) await this.store.zero(offset, length);
            else throw new Error(`extent kind ${kind} in a request's plan`);
          }),
        );
      }
    } catch (err) {
      errno = errnoOf(err);
    }
    if (flags === SUBMIT_FLAGS.needsEngine) {
      this.ordered.push(tag, errno);
    } else {
      // Completed here, as the queue thread does; the engine hears of it afterwards.
      this.settle(tag, errno ? -errno : 0);
      this.done.push(tag, errno);
    }
    this.deliver();
  }

  private settle(tag: number, result: number): void {
    const w = this.waiting.get(tag);
    if (!w) throw new Error(`tag ${tag} completed twice or never asked for`);
    this.waiting.delete(tag);
    w.settle(result);
  }

  /** One delivery per turn of the event loop, as the queue thread's wake-ups are. */
  private deliver(): void {
    this.delivery ??= new Promise<void>((resolve) =>
      setImmediate(() => {
        this.delivery = null;
        resolve();
        if (this.closed) return;
        const ev = this.options.events;
        const depth = this.options.depth;
        const orderedAt = EVENTS.requestFields * depth;
        const doneAt = orderedAt + 2 * depth;
        const [requests, ordered, done] = [this.requests, this.ordered, this.done];
        this.requests = [];
        this.ordered = [];
        this.done = [];
        ev.set(requests, 0);
        ev.set(ordered, orderedAt);
        ev.set(done, doneAt);
        this.options.onEvents(0, requests.length / EVENTS.requestFields, ordered.length / 2, done.length / 2, 0, false);
      }),
    );
  }
}
