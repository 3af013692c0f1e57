/**
 * What one map commit writes, and where: the slot each map page's committed version is in, the
 * superblock copy that holds the committed superblock, and the steps that move both forward
 * (docs/format.md, "Commits"). The Volume decides when to commit and what it captures; this
 * keeps the bookkeeping of the durable copies.
 */
import { type BlockStore, FLUSH, type OrderedStep, type StepRunner, inOrder } from '../io/block-store.js';
import { encodeMapSlotInto, encodeSuperblockInto, type Layout, mapDigestTerm, type MapRecord, mapSlotOffset, type Superblock, superblockOffset } from '../format/format.js';
import type { CapturedMarks } from './change-tracking.js';

/** Per map page: the slot holding its committed version, that version's sequence and commit. */
export interface PageSlots {
  slot: Uint8Array;
  sequence: Float64Array;
  slotCommit: Float64Array;
  /** The number of the next map commit at open: above every commit number on disk. */
  nextCommit: number;
}

/** What a commit captured for writing. */
export interface CommitCapture {
  /** The committed superblock, as it stands (its state included). */
  sb: Superblock & { map: MapRecord };
  /** Both superblock copies must be written: the state changed, or a copy is invalid or behind. */
  bothCopies: boolean;
  /** Only writes waiting for their chunks' marks asked for it: no data needs flushing first. */
  marksOnly: boolean;
  /**
   * Redirect pages to write, and each one's payload: read by write() before its first await,
   * so it may be a view of the live map as long as nothing changes the map until then.
   */
  redirectPages: readonly number[];
  redirectPayload: (page: number) => Uint8Array | null;
  /** Tracking pages to write. */
  marks: CapturedMarks;
  /**
   * The map-change count at the capture, when one flush alone runs the commit on its queue
   * thread: the first flush becomes skippable at it (OrderedStep), for a thread whose own
   * fdatasync, begun after that flush arrived, began at the same count. Every change the
   * capture holds then had its data complete before that fdatasync began, and no other caller
   * needs the flush: the commit serves no one else. Undefined: the first flush always runs.
   */
  syncCoveredAt?: number;
}

/**
 * The commit state a queue thread's map commit shares with the engine's commit writer, one f64
 * each (native/wire.h's commit_state, which says what each holds; test/wire.test.ts checks that
 * both agree).
 */
export const COMMIT_STATE = {
  nextCommit: 0,
  sbCopy: 1,
  generation: 2,
  mapCommit: 3,
  digest: 4,
  done: 5,
  journalMark: 6,
  failed: 7,
  period: 8,
} as const;
export const COMMIT_STATE_FIELDS = 9;

export class CommitWriter {
  /**
   * The commit state (COMMIT_STATE): the next map commit's number and the superblock copy
   * holding the committed superblock, which this writer moves on, and what a queue thread's map
   * commit shares with it (native/redirector.h): both read and write it, and the page slots,
   * one commit at a time, the thread under the volume's map lock, this writer while no thread's
   * commit can run (Volume.waitForNativeCommit, nativeCommitAllowed).
   */
  readonly state = new Float64Array(COMMIT_STATE_FIELDS);
  /** The committed superblock's image, for a queue thread's map commit (the volume encodes it). */
  readonly superblockImage: Uint8Array;
  /** Tracking pages open rewrites as they were found (redirect pages are rewritten from the map). */
  private readonly rewrites = new Set<number>();
  private readonly rewrittenPayloads = new Map<number, Uint8Array>();
  /**
   * The images of a commit of up to IMAGE_BLOCKS pages and the superblock, encoded again by
   * each: one commit writes at a time (the volume's commit loop), and its steps are done before
   * write() returns. A larger commit (a resync's, a state change's) gets buffers of its own.
   */
  private readonly images: Uint8Array;

  constructor(
    private readonly store: BlockStore,
    private readonly layout: Layout,
    readonly pages: PageSlots,
    sbCopy: number,
  ) {
    this.state[COMMIT_STATE.sbCopy] = sbCopy;
    this.state[COMMIT_STATE.nextCommit] = pages.nextCommit;
    this.images = new Uint8Array(IMAGE_BLOCKS * layout.blockSize);
    this.superblockImage = new Uint8Array(layout.blockSize);
  }

  /** A tracking page the next commit rewrites as it was found (`payload`; else empty). */
  rewrite(page: number, payload: Uint8Array | undefined): void {
    this.rewrites.add(page);
    if (payload) this.rewrittenPayloads.set(page, payload);
  }

  get pendingRewrites(): number {
    return this.rewrites.size;
  }

  /**
   * Writes one commit: (1) flush the store, so the data of every captured map change is
   * durable (skipped when only marks are written and nothing else asks for it: marks order
   * nothing after data); (2) each page to its older slot with sequence + 1 and the commit's
   * number; (3) flush; (4) when pages were written or both copies must be, the superblock
   * (generation + 1, the map commit and its digest) to its older copy; (5) flush; for both
   * copies, (4) and (5) again for the other. Returns the committed superblock's new generation
   * and map, or null when no superblock was written.
   */
  async write(c: CommitCapture, run?: StepRunner): Promise<{ generation: number; map: MapRecord } | null> {
    const { layout, pages: slots } = this;
    const { sb, marks, redirectPages } = c;
    const rewrites = [...this.rewrites].filter((p) => !marks.pages.includes(p));
    this.rewrites.clear();
    const pages = marks.pages.length || rewrites.length ? [...redirectPages, ...marks.pages, ...rewrites] : [...redirectPages];
    const payload = (p: number, i: number): Uint8Array | null => {
      if (i < redirectPages.length) return c.redirectPayload(p);
      if (i < redirectPages.length + marks.pages.length) return marks.payloads[i - redirectPages.length];
      return this.rewrittenPayloads.get(p) ?? null;
    };
    // A commit that writes pages gets a new number; the digest follows page by page.
    const { state } = this;
    const mapCommit = pages.length ? state[COMMIT_STATE.nextCommit] : sb.map.commit;
    let digest = sb.map.digest;
    for (const p of pages) {
      digest = (digest - mapDigestTerm(p, slots.sequence[p], slots.slotCommit[p]) + mapDigestTerm(p, slots.sequence[p] + 1, mapCommit)) >>> 0;
    }
    const bs = layout.blockSize;
    const room = pages.length + 1 <= IMAGE_BLOCKS ? this.images : new Uint8Array((pages.length + 1) * bs);
    const images = pages.map((p, i) =>
      encodeMapSlotInto(room.subarray(i * bs, (i + 1) * bs), sb.uuid, p, slots.sequence[p] + 1, payload(p, i), mapCommit, digest),
    );
    const next = { generation: sb.generation + 1, map: { commit: mapCommit, digest } };
    // The superblock records the commit, so a damaged slot of it is found out, not replaced by
    // the older slot. After a state change both copies get it, one after the other: a crash
    // between them leaves one of each generation (the newer wins), and later damage to either
    // copy leaves the current state. A map-only commit writes one copy, the older: damage to
    // it leaves the other, one commit behind, and open rolls that commit forward.
    const sbRoom = room.subarray(pages.length * bs, (pages.length + 1) * bs);
    const sbImage = pages.length || c.bothCopies ? encodeSuperblockInto(sbRoom, { ...sb, ...next }) : null;
    const firstCopy = 1 - state[COMMIT_STATE.sbCopy];
    const steps: OrderedStep[] = [];
    if (!c.marksOnly || redirectPages.length > 0 || c.bothCopies) {
      // Not for a state change: the writes it must order before the new state (all that
      // completed before the gate closed) change no map, so no count tells whether a sync covers
      // them.
      steps.push(c.syncCoveredAt !== undefined && !c.bothCopies ? { kind: 'flush', skippableAt: c.syncCoveredAt } : FLUSH);
    }
    if (pages.length) {
      pages.forEach((p, i) => steps.push({ kind: 'write', data: images[i], offset: mapSlotOffset(layout, p, 1 - slots.slot[p]) }));
      steps.push(FLUSH);
    }
    if (sbImage) {
      for (const copy of c.bothCopies ? [firstCopy, 1 - firstCopy] : [firstCopy]) {
        steps.push({ kind: 'write', data: sbImage, offset: superblockOffset(copy, layout.blockSize) }, FLUSH);
      }
    }
    // One call for the lot: a failure anywhere fails the volume, so nothing below needs to know
    // how far it got.
    await (run?.(steps) ?? inOrder(this.store, steps));
    if (pages.length) {
      for (const p of pages) {
        slots.slot[p] = 1 - slots.slot[p];
        slots.sequence[p] += 1;
        slots.slotCommit[p] = mapCommit;
      }
      state[COMMIT_STATE.nextCommit] = mapCommit + 1;
    }
    for (const p of rewrites) this.rewrittenPayloads.delete(p);
    if (!sbImage) return null;
    state[COMMIT_STATE.sbCopy] = firstCopy;
    return next;
  }
}

/**
 * Blocks of images a commit encodes into the writer's own buffer: a first touch's flush writes
 * a map page, a tracking page and the superblock; 64 KiB kept for the volume's life.
 */
const IMAGE_BLOCKS = 16;
