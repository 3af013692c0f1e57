/**
 * Every number that crosses between TypeScript and the addon, defined once on this side: the
 * C++ side's definitions are in native/wire.h, and test/wire.test.ts checks that both agree (the
 * addon exports its own as `wire`). The publication's words and modes are the engine's
 * (src/engine/publication.ts), checked by the same test.
 */

/** How an extent's data moves (native/wire.h's Kind): a plan's IoOp kinds and a store's steps. */
export const EXTENT_KIND = { read: 0, write: 1, zero: 2, sync: 3, meta: 4 } as const;

/** What happens to a tag's plan record once its extents are done (see native/wire.h). */
export const SUBMIT_FLAGS = { needsEngine: 1, inOrder: 2 } as const;

/**
 * A commit's sync step that its flush's queue thread may skip: (sync, map-change count, 0, this)
 * (native/wire.h, kCommitSyncSkippable).
 */
export const COMMIT_SYNC_SKIPPABLE = 1;

/** How a commit's steps are packed as a tag's records: its writes, its syncs, a skippable sync. */
export const COMMIT_STEP_KINDS = { write: EXTENT_KIND.meta, flush: EXTENT_KIND.sync, skippable: COMMIT_SYNC_SKIPPABLE } as const;

/** The flags of a new request as the device reports them. */
export const REQUEST_FLAGS = { fua: 1 } as const;

/**
 * The events buffer the device writes each delivery into, per tag of depth: request records
 * (tag, op, flags, offset, length), then (tag, errno) pairs of ordered and of done requests,
 * then redirect records (tag, errno, offset, length).
 */
export const EVENTS = { requestFields: 5, redirectFields: 4, perTag: 13 } as const;

/**
 * What a queue thread's tag is doing (native/wire.h's TagState), as the device's inspect()
 * reports it, and how the daemon names each.
 */
export const TAG_STATE = { idle: 0, fetching: 1, engine: 2, running: 3, waiting: 4, dead: 5, fast: 6 } as const;
export const TAG_STATE_NAMES: Record<number, string> = {
  [TAG_STATE.idle]: 'idle',
  [TAG_STATE.fetching]: 'fetching',
  [TAG_STATE.engine]: 'planning',
  [TAG_STATE.running]: 'running',
  [TAG_STATE.waiting]: 'waiting for the engine',
  [TAG_STATE.dead]: 'dead',
  [TAG_STATE.fast]: 'served by the queue thread',
};
