/**
 * The raw interface of build/Release/cldd_native.node. Only ./addon.ts loads the addon; everything
 * else goes through the classes built on it. Errors thrown or rejected by the addon carry `code`
 * (an errno name such as ENODEV, EBUSY, EPERM) and a message naming the operation.
 */

export interface NativeError extends Error {
  code: string;
  errno?: number;
}

/** A backing file or block device whose I/O goes through one io_uring. */
export declare class NativeStoreHandle {
  /** Opens `path` (O_EXCL for a writable block device); `lock` takes an exclusive flock. */
  constructor(path: string, readOnly: boolean, lock: boolean);
  readonly size: number;
  readonly isBlockDevice: boolean;
  readonly fd: number;
  read(buffer: Uint8Array, offset: number): Promise<void>;
  write(data: Uint8Array, offset: number): Promise<void>;
  /** Punches a hole: the range reads back as zeros. */
  zero(offset: number, length: number): Promise<void>;
  /** fdatasync. */
  flush(): Promise<void>;
  /** Runs (kind 0 read | 1 write | 2 zero, offset, length, bufferOffset) records concurrently. */
  run(ops: Float64Array, buffer: Uint8Array): Promise<void>;
  /**
   * Runs (kind 0 read | 1 write | 3 flush, offset, length, bufferOffset) records one after
   * another, with blocking calls on a worker thread; the first error rejects and skips the rest.
   */
  sequence(ops: Float64Array, buffer: Uint8Array): Promise<void>;
  /**
   * A merge window's copy: (from, to, length, bufferOffset) runs, every read into `buffer` and
   * then every write from it, as sequence() runs them; every run checked first (EINVAL). Where
   * a run's source is a hole of 256 KiB or more (SEEK_HOLE), its destination is punched instead.
   */
  copy(runs: Float64Array, buffer: Uint8Array): Promise<void>;
  /** A file only: whether its file system punches holes (a punch past its end, which changes nothing). */
  punchesHoles(): boolean;
  /** Waits for the requests in flight, then closes the ring and the fd. */
  close(): Promise<void>;
}

/** /dev/ublk-control with its 128-byte-SQE ring. */
export declare class NativeControlHandle {
  /** Throws code ENODEV when the driver is not loaded. */
  constructor();
  /**
   * Sends one control command: `cmdOp` is the ioctl-encoded or the legacy opcode; `buffer` (or
   * null) becomes the command's addr/len. Resolves with the completion's non-negative result.
   */
  command(cmdOp: number, devId: number, queueId: number, data0: number, buffer: Uint8Array | null, name: string, token?: number): Promise<number>;
  /**
   * Cancels the pending command sent with `token` (an io_uring async cancel, which interrupts
   * the kernel's wait in START_DEV or END_USER_RECOVERY: the command then fails with EINTR).
   * False when no such command is pending.
   */
  cancel(token: number): boolean;
  close(): void;
}

/**
 * Called from the event loop when a queue's wake-up brought requests or ordered completions (or
 * when completed requests have waited kDoneDelayMs for such a call), with counts of entries the
 * native side wrote into the `events` buffer (depth D), valid only during the call:
 *  - requests at [0, 5D): (tag, op, flags, offset bytes, length bytes) records of new requests;
 *  - ordered at [5D, 7D): (tag, errno) pairs of requests whose ops finished and that wait for the
 *    engine (orderedFinish or commit) before completion; errno 0 when every op succeeded;
 *  - done at [7D, 9D): (tag, errno) pairs of requests already completed to the kernel (finish
 *    afterwards);
 *  - redirects at [9D, 13D): (tag, errno, offset bytes, length bytes) records of snapshot writes
 *    the fast path ran into the change area, whose blocks the engine must redirect
 *    (Volume.finishFastRedirect) before complete() (docs/serving.md);
 *  - stopped: true once every tag of the queue has been aborted by the kernel.
 */
export type QueueEventHandler = (queue: number, requests: number, ordered: number, done: number, redirects: number, stopped: boolean) => void;

export interface NativeDeviceOptions {
  devId: number;
  queues: number;
  depth: number;
  bufferBytes: number;
  backingFd: number;
  /** Whether the I/O commands use the ioctl-encoded opcodes (UBLK_F_CMD_IOCTL_ENCODE). */
  ioctlEncode: boolean;
  /** The device has UBLK_F_AUTO_BUF_REG and UBLK_F_USER_COPY (see native/device.cc). */
  zeroCopy: boolean;
  /**
   * The device has UBLK_F_USER_COPY: the kernel copies nothing and the queue threads copy each
   * request themselves, so no tag needs a buffer as large as a request (implied by zeroCopy; see
   * native/device.cc).
   */
  userCopy: boolean;
  /** Which of the volume's devices this is: the fast path serves each by its own rules. */
  target: 'master' | 'slave';
  /** What the engine publishes for the fast path (docs/serving.md); without it none is taken. */
  published?: NativePublication;
  onEvents: QueueEventHandler;
  /** At least 13 x depth numbers; see QueueEventHandler. */
  events: Float64Array;
  /** Where a commit's meta extents take their bytes from; without it a flush cannot run one. */
  meta?: Uint8Array;
  /** Per queue, the CPU its thread runs on; -1 or absent: wherever the scheduler puts it. */
  cpus?: number[];
  /**
   * How long a queue thread polls its ring for work before it sleeps, µs (clamped to
   * wire.maxPollMicros); 0 or absent: never. Ignored where this process may run on one CPU only,
   * or where the kernel's ring cannot say that work waits (before 6.1).
   */
  pollMicros?: number;
}

/** The engine's publication (src/engine/publication.ts) and the volume's geometry. */
export interface NativePublication {
  words: Int32Array;
  bits: Uint32Array;
  /** Changed-block tracking's durable marks (ChangeTracking.durableBits), null without tracking. */
  trackBits: Uint32Array | null;
  /** Bytes per tracked chunk, as a power of two. */
  chunkShift: number;
  dataOffset: number;
  changeOffset: number;
  blockSize: number;
  blocks: number;
  /** The master's: where its queue threads redirect first touches (native/redirector.h); null for none. */
  redirector?: NativeRedirector | null;
}

/** native/redirector.h; src/engine/publication.ts's MapRedirector. */
export declare class NativeRedirector {
  constructor();
  hold(): Float64Array | null;
  release(journalFd: number, journalLength: number, enabled: boolean, commitAllowed?: boolean): void;
  /**
   * Under hold(): the arrays and layout a queue thread's map commit works on, shared (the engine's
   * NativeCommitSetup, src/engine/publication.ts, which this layer does not import).
   */
  configureCommit(setup: object): void;
  /** A queue thread's map commit, for the engine's tests: its steps as (kind, offset, length, bufferOffset) records in `meta`, or null. */
  captureCommit(published: NativePublication, meta: Uint8Array): Float64Array | null;
  /** Its steps ended: 0, or the errno that failed one. True: the engine waits for it (wake it: takeRedirects). */
  commitDone(published: NativePublication, errno: number): boolean;
  /** What a queue thread does with a batch of first touches, for the engine's tests: redirects [start, end) pairs of blocks, all or none. */
  redirect(published: NativePublication, ranges: Float64Array): boolean;
}

/**
 * One queue as the native side holds it. `states[tag]`: 0 idle, 1 fetching (the kernel has the
 * tag; no request), 2 engine (handed to JS to plan), 3 running (its backing I/O), 4 waiting
 * (its I/O is done; the engine must finish it and complete it), 5 dead (out of service), 6 fast
 * (served by the queue thread without the engine).
 */
export interface NativeQueueState {
  states: Uint8Array;
  /** Milliseconds since each tag's request arrived (0 for a tag that never had one). */
  ages: Float64Array;
  /** Entries gathered for the next delivery to JS. */
  requests: number;
  ordered: number;
  done: number;
  redirects: number;
  backingInFlight: number;
  fastInFlight: number;
  /** Why the queue's thread stopped serving early (its ring failed), or null. */
  failure: string | null;
}

/** The serving side of one ublk device: /dev/ublkcN, its descriptor mappings and queue rings. */
export declare class NativeDeviceHandle {
  /** Opens /dev/ublkcN, maps every queue's descriptors and sets up the rings. */
  constructor(options: NativeDeviceOptions);
  /** Issues FETCH_REQ for every tag of every queue. */
  start(): void;
  /**
   * Executes plans: records of (tag, flags, opCount, then opCount x (kind, backing offset,
   * length, buffer offset)). Flags 0 or serving.submitFlags.needsEngine: read, write and zero
   * extents within the request's buffer, all at once. serving.submitFlags.inOrder: a flush's
   * commit, sync extents (length 0) and meta extents (bytes from `meta`), each after the one
   * before it; the first error skips the rest.
   */
  submit(queue: number, plans: Float64Array, length: number): void;
  /** Completes requests to the kernel: (tag, result) pairs, result 0 for success or -errno. */
  complete(queue: number, results: Int32Array, length: number): void;
  /** Where every tag of a queue is (a stuck request's report); see NativeQueueState. */
  inspect(queue: number): NativeQueueState;
  /** Fast-path requests in flight, over every queue (between their decision and their I/O's end). */
  fastInFlight(): number;
  /**
   * What the fast path served: reads, writes, flushes, bytes read, bytes written, errors; then
   * the queue threads' polls that caught a request (or the engine's answer) and that ran out.
   */
  stats(): Float64Array;
  /** The last error that took a tag out of service (other than the kernel's abort), or null. */
  readonly lastError: string | null;
  /**
   * Tears everything down; safe at any time and more than once. Returns the completions not yet
   * delivered as (queue, tag, errno) triples.
   */
  close(): Int32Array;
}

export interface NativeAddon {
  Store: typeof NativeStoreHandle;
  Control: typeof NativeControlHandle;
  Device: typeof NativeDeviceHandle;
  Redirector: typeof NativeRedirector;
  /** sd_notify(3): sends `message` to the datagram socket `socket` ('@' for abstract names). */
  notify(socket: string, message: string): void;
  /** FIFREEZE on the filesystem mounted at `mountpoint`, on a worker thread. */
  freeze(mountpoint: string): Promise<void>;
  /** FITHAW, on a worker thread. */
  thaw(mountpoint: string): Promise<void>;
  /**
   * Gives the whole pages inside `bytes` back to the kernel (MADV_DONTNEED): they read as zeros
   * afterwards and hold no memory until written. Returns the bytes released; EINVAL unless
   * `bytes` is its whole ArrayBuffer.
   */
  releasePages(bytes: Uint8Array): number;
  /** No transparent huge pages for this process and its children from now on (PR_SET_THP_DISABLE). */
  disableHugePages(): void;
  /** malloc maps every block of `bytes` or more on its own, and stops moving that threshold (mallopt). EINVAL past 32 MiB. */
  fixMmapThreshold(bytes: number): void;
  /** The processes other than this one holding `path` open: each /proc/PID/fd link that reads exactly `path`. */
  openersOf(path: string): Promise<{ pid: number; command: string }[]>;
  /**
   * The fast path's decision for a request (native/serving.h), as the queue threads take it:
   * its extents as (kind, offset, length, bufferOffset) records; whether its blocks are
   * redirected after them (by the redirector, else Volume.finishFastRedirect); whether they run
   * one after another; whether a map commit of the redirector's follows (a FUA write in a
   * snapshot, the engine taking the whole request when it declines); or null when the engine
   * must decide.
   */
  planFast(
    published: NativePublication,
    target: 'master' | 'slave',
    opFlags: number,
    offset: number,
    length: number,
  ): { extents: Float64Array; redirect: boolean; inOrder: boolean; commit: boolean } | null;
  /**
   * Whether the commit step record at `records[at]` is an fdatasync that a flush's own sync,
   * begun at map-change count `count` (and `done`: it succeeded), makes needless (native/serving.h,
   * OwnSyncCovers), as the flush's queue thread decides it.
   */
  ownSyncCovers(done: boolean, count: number, records: Float64Array, at: number): boolean;
  /**
   * CRC-32C (Castagnoli) of `data[start, end)` continuing from `seed` (native/checksum.cc);
   * throws code EINVAL for a range outside `data`.
   */
  crc32c(data: Uint8Array, start?: number, end?: number, seed?: number): number;
  /** native/wire.h's numbers (test/wire.test.ts checks them against src/native/wire.ts). */
  wire: {
    publishedWord: { mode: number; commitPending: number; generation: number; redirected: number; mapChanges: number; nativeCommit: number; count: number };
    fastMode: { off: number; plain: number; snapshot: number; resync: number };
    extentKind: { read: number; write: number; zero: number; sync: number; meta: number };
    submitFlags: { needsEngine: number; inOrder: number };
    requestFlags: { fua: number };
    events: { requestFields: number; redirectFields: number; perTag: number };
    journalRecord: number;
    commitSyncSkippable: number;
    maxPollMicros: number;
    commitState: Record<'nextCommit' | 'sbCopy' | 'generation' | 'mapCommit' | 'digest' | 'done' | 'journalMark' | 'failed' | 'period' | 'count', number>;
    tagState: Record<'idle' | 'fetching' | 'engine' | 'running' | 'waiting' | 'dead' | 'fast', number>;
  };
}
