/**
 * The control socket's methods: what each one takes and what it answers, checked in one place.
 * The daemon checks every request's params here before a handler sees them (anything else is
 * refused with EINVAL), and the CLI checks every reply here before it prints or acts on it (a
 * malformed reply is EPROTO, never taken for success).
 */
import { CldError } from '../errors.js';
import { LIMITS } from './config.js';

/** Reads an untrusted JSON value as a T, or throws a message saying where it is wrong. */
export type Check<T> = (value: unknown, at: string) => T;

class ShapeError extends Error {}

const fail = (at: string, what: string): never => {
  throw new ShapeError(`${at} must be ${what}`);
};

export const isPlainObject = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null && !Array.isArray(v);

const string: Check<string> = (v, at) => (typeof v === 'string' ? v : fail(at, 'a string'));
const boolean: Check<boolean> = (v, at) => (typeof v === 'boolean' ? v : fail(at, 'true or false'));
const literal =
  <T extends string | number | boolean>(expected: T): Check<T> =>
  (v, at) =>
    v === expected ? expected : fail(at, JSON.stringify(expected));
/** A whole number from min to max (no NaN, fractions or infinities). */
const integer =
  (min: number, max: number = Number.MAX_SAFE_INTEGER): Check<number> =>
  (v, at) =>
    typeof v === 'number' && Number.isSafeInteger(v) && v >= min && v <= max ? v : fail(at, `a whole number from ${min} to ${max}`);
const count = integer(0);
/** A finite number, not negative (rates, durations). */
const amount: Check<number> = (v, at) => (typeof v === 'number' && Number.isFinite(v) && v >= 0 ? v : fail(at, 'a number, not negative'));
const nullable =
  <T>(check: Check<T>): Check<T | null> =>
  (v, at) =>
    v === null ? null : check(v, at);
const optional =
  <T>(check: Check<T>): Check<T | undefined> =>
  (v, at) =>
    v === undefined ? undefined : check(v, at);
const array =
  <T>(check: Check<T>): Check<T[]> =>
  (v, at) =>
    Array.isArray(v) ? v.map((e, i) => check(e, `${at}[${i}]`)) : fail(at, 'an array');

type Shape = Record<string, Check<unknown>>;
type Checked<S extends Shape> = { [K in keyof S]: ReturnType<S[K]> };

/**
 * An object with these members. `strict` refuses members the shape does not name (requests: a
 * misspelt option must not be ignored); replies may carry more than a client knows of.
 */
const object =
  <S extends Shape>(shape: S, strict = false): Check<Checked<S>> =>
  (v, at) => {
    if (!isPlainObject(v)) return fail(at, 'an object');
    if (strict) {
      const unknown = Object.keys(v).find((k) => !Object.prototype.hasOwnProperty.call(shape, k));
      if (unknown !== undefined) throw new ShapeError(`${at} has no member ${JSON.stringify(unknown)}`);
    }
    const out: Record<string, unknown> = strict ? {} : { ...v };
    for (const key of Object.keys(shape)) {
      const value = shape[key](Object.prototype.hasOwnProperty.call(v, key) ? v[key] : undefined, `${at}.${key}`);
      if (value === undefined) delete out[key];
      else out[key] = value;
    }
    return out as Checked<S>;
  };

/** The longest `progress` reply may wait for a resync to end: well inside its reply bound. */
export const PROGRESS_WAIT_MAX_MS = 10_000;

const resyncProgress = {
  running: boolean,
  blocksLeft: count,
  blocksMerged: count,
  rate: amount,
  secondsLeft: nullable(amount),
  error: nullable(string),
};

const tracking = object({
  chunkSize: integer(1),
  /** The snapshot the current set counts from, and the bytes (whole chunks) written since. */
  since: count,
  changedBytes: count,
  /** The last delta (snapshot since-1 -> since), in bytes; null before there is one. */
  deltaBytes: nullable(count),
});

/** [byte offset, length] on the master. */
const extent: Check<[number, number]> = (v, at) =>
  Array.isArray(v) && v.length === 2 ? [count(v[0], `${at}[0]`), integer(1)(v[1], `${at}[1]`)] : fail(at, 'an [offset, length] pair');

/** Extents per reply of `changes`: a reply line stays far below the 1 MiB the reader takes. */
export const CHANGES_PAGE = 16384;

const pairStatus = object({
  name: string,
  backing: string,
  pid: integer(1),
  state: string,
  master: nullable(string),
  slave: nullable(string),
  capacity: count,
  blockSize: integer(1),
  redirected: count,
  snapshot: count,
  stateChangedAt: optional(nullable(amount)),
  resync: nullable(object(resyncProgress)),
  counters: object({
    reads: count,
    writes: count,
    flushes: count,
    discards: count,
    bytesRead: count,
    bytesWritten: count,
    errors: count,
    fastPath: optional(count),
    commits: optional(count),
    queueCommits: optional(count),
    pollsCaught: optional(count),
    pollsRanOut: optional(count),
  }),
  failed: nullable(string),
  /** Requests the devices have not completed yet, and the age of the oldest (ms). */
  requests: optional(object({ outstanding: count, oldestMs: nullable(amount) })),
  /** The store's uuid (32 hex digits). */
  uuid: optional(string),
  /** Changed-block tracking; null for a store without it (format version 2). */
  tracking: optional(nullable(tracking)),
  /** The map journal in /run/cldd; null when the daemon keeps none. */
  journal: optional(nullable(object({ bytes: count, uncommittedBytes: count, compactionError: nullable(string) }))),
});

const none = object({}, true);

/**
 * Every method: a check of its params (absent params are {}) and of its result. The types the
 * daemon's handlers and the CLI's calls use are derived from these checks.
 */
export const METHODS = {
  status: { params: none, result: pairStatus },
  requests: { params: none, result: object({ devices: array(object({ device: string, requests: array(object({})) })) }) },
  enable: {
    params: object(
      {
        /** Freeze this mountpoint; '' or absent: freeze wherever the master is mounted. */
        freeze: optional(string),
        /** Do not freeze even when the master is mounted. */
        noFreeze: optional(boolean),
        /** From resync, wait for the merge to finish instead of refusing. */
        wait: optional(boolean),
      },
      true,
    ),
    result: object({ epoch: count, frozen: nullable(string), frozenMs: nullable(amount) }),
  },
  disable: { params: none, result: object({ state: string, blocks: count }) },
  /**
   * The resync's progress. With `waitMs`, the reply waits while the resync runs, up to that long,
   * and comes the moment it ends (done, stopped or failed): a follower learns of the end when it
   * happens, without polling the daemon's event loop every few milliseconds.
   */
  progress: { params: object({ waitMs: optional(integer(0, PROGRESS_WAIT_MAX_MS)) }, true), result: object({ state: string, ...resyncProgress }) },
  /**
   * What differs between snapshot `since` (default: the one before) and the enabled snapshot:
   * extents of the master in order, CHANGES_PAGE per reply from byte offset `after` on; `next`
   * is where the next page starts. `available` false: not tracked (`reason` says why), and the
   * extents cover the whole master.
   */
  changes: {
    params: object({ since: optional(count), after: optional(count) }, true),
    result: object({
      uuid: string,
      snapshot: count,
      since: count,
      available: boolean,
      reason: nullable(string),
      chunkSize: integer(1),
      capacity: count,
      changedBytes: count,
      extentCount: count,
      extents: array(extent),
      next: nullable(count),
    }),
  },
  'resync-rate': {
    params: object({ bytesPerSecond: integer(LIMITS.resyncRate.min, LIMITS.resyncRate.max) }, true),
    result: object({ bytesPerSecond: integer(LIMITS.resyncRate.min, LIMITS.resyncRate.max) }),
  },
  stop: { params: object({ force: optional(boolean) }, true), result: object({ stopping: literal(true) }) },
} as const;

export type Method = keyof typeof METHODS;

/** How the master is served: what `cldd add` reports, and what a takeover must keep. */
const deviceLayout = object({ queues: integer(1), depth: integer(1), zeroCopy: boolean });
export type DeviceLayout = ReturnType<typeof deviceLayout>;

/** What a daemon tells whoever started it once it serves (null devices: none, as in tests). */
const readyMessage = object({
  master: nullable(string),
  slave: nullable(string),
  pid: integer(1),
  state: string,
  /** The devices of a daemon that died, taken over (user recovery). */
  recovered: boolean,
  layout: nullable(deviceLayout),
});
export type ReadyMessage = ReturnType<typeof readyMessage>;

/** The daemon's one line to its starter (cldd daemon --ready-fd): ready, or why it is not. */
export type ReadyLine = { ready: ReadyMessage } | { error: { code: string; message: string } };

/** A ready line as the starter uses it, or EPROTO saying what is wrong. */
export function checkReadyLine(value: unknown, daemon: string): ReadyLine {
  try {
    if (isPlainObject(value) && value.error !== undefined) return { error: object({ code: string, message: string })(value.error, 'error') };
    return { ready: readyMessage(isPlainObject(value) ? value.ready : undefined, 'ready') };
  } catch (err) {
    if (err instanceof ShapeError) throw new CldError('EPROTO', `the daemon of "${daemon}" reported a malformed start: ${err.message}`);
    throw err;
  }
}

/**
 * How long the CLI waits for each method's reply. The daemon bounds every wait of its own
 * (a state change's drain and the fast path's, 30 s each; FIFREEZE 10 s; STOP_DEV 60 s, DEL_DEV
 * and START_DEV's cancel 10 s each; START_DEV 30 s; an enable's wait for a resync that started
 * after the CLI followed one, 120 s): these are above their sums, so that the daemon's own
 * error, which says what it waited for, is the one the user sees. `enable --wait` follows the
 * resync first (src/cli/progress.ts) and then enables as usual.
 */
export const REPLY_BOUND_MS: Record<Method, number> = {
  status: 30_000,
  requests: 30_000,
  enable: 240_000,
  disable: 240_000,
  progress: 30_000,
  changes: 60_000,
  'resync-rate': 30_000,
  stop: 30_000,
};
export type Params<M extends Method> = ReturnType<(typeof METHODS)[M]['params']>;
export type Result<M extends Method> = ReturnType<(typeof METHODS)[M]['result']>;
export type PairStatus = Result<'status'>;
export type ResyncRateParams = Params<'resync-rate'>;

export const isMethod = (name: unknown): name is Method => typeof name === 'string' && Object.prototype.hasOwnProperty.call(METHODS, name);

/** A request's params as the method takes them, or EINVAL saying what is wrong. */
export function checkParams<M extends Method>(method: M, params: unknown): Params<M> {
  try {
    return METHODS[method].params(params === undefined ? {} : params, 'params') as Params<M>;
  } catch (err) {
    if (err instanceof ShapeError) throw new CldError('EINVAL', `${method}: ${err.message}`);
    throw err;
  }
}

/** A reply's result as the CLI uses it, or EPROTO saying what is wrong. */
export function checkResult<M extends Method>(method: M, result: unknown, daemon: string): Result<M> {
  try {
    return METHODS[method].result(result, 'result') as Result<M>;
  } catch (err) {
    if (err instanceof ShapeError) throw new CldError('EPROTO', `the daemon of "${daemon}" answered ${method} with a malformed reply: ${err.message}`);
    throw err;
  }
}

/** The handlers a daemon serves: each gets its params checked and must give its result's type. */
export type MethodHandlers = { [M in Method]: (params: Params<M>) => Promise<Result<M>> };

/** Wraps typed handlers for the control server: params are checked before the handler runs. */
export function checkedHandlers(handlers: MethodHandlers): Record<string, (params: unknown) => Promise<unknown>> {
  const out: Record<string, (params: unknown) => Promise<unknown>> = {};
  for (const method of Object.keys(METHODS) as Method[]) {
    const handler = handlers[method] as (params: unknown) => Promise<unknown>;
    out[method] = async (params) => handler(checkParams(method, params));
  }
  return out;
}
