/**
 * The map journal: every map change, appended before the request that made it completes, to a
 * file on tmpfs (/run/cldd). It exists for one failure only: the daemon dies (SIGKILL, a crash)
 * while the machine runs on. The data of writes completed since the last commit is then safe in
 * the backing store's page cache, but their redirect bits lived in the dead process; replaying
 * the journal brings them back. tmpfs goes when the page cache goes (power loss, reboot), so
 * the journal can never outlive the data it describes, and after a power loss the store's own
 * commit protocol is all that counts.
 *
 * Layout (native/redirector.cc appends records too): a 32-byte header (magic "cldd-mj1", the
 * store uuid, u64 snapshot epoch the records belong to plus one, 0 where an older cldd did not
 * record it), then 24-byte records: first block (f64), end block (f64), 1 = redirected / 0 = not
 * (u8), 7 zero bytes. The epoch is rewritten whenever the journal is emptied; a state change
 * empties it (its commits capture everything).
 * Records are assignments, so replaying them in order over the committed map gives the map the
 * process had, however many of them a commit already covered.
 *
 * A commit that captured every record cuts the file back to its header. Under a steady writer
 * records keep arriving while each commit runs, so that alone never happens: a busy snapshot's
 * journal grew by a record per first touch (33,874 records, 813 KB, in 25 s of one random writer
 * with an fsync every 100 ms in the test VM; up to 24 bytes per block of the data area, in RAM).
 * So once the records a commit covered take COMPACT_BYTES, the ones after them are written to
 * `PATH.new` and that file renamed over the journal, as create() starts it: a rename is atomic,
 * so a death at any point leaves one whole journal holding every record not yet committed.
 */
import { closeSync, constants, existsSync, ftruncateSync, openSync, readFileSync, readSync, renameSync, rmSync, unlinkSync, writeSync } from 'node:fs';
import { CldError } from '../errors.js';

const MAGIC = 'cldd-mj1';
const HEADER = 32;
/** Bytes per record; native/redirector.cc writes them too (native/wire.h, kJournalRecord). */
export const RECORD = 24;

/**
 * Committed records are dropped from a journal still in use once they take this much: at most
 * 2,730 records, written off in one rename (six system calls and a copy of the records after
 * them), against the system call every record cost.
 */
export const COMPACT_BYTES = 64 << 10;

/** What a previous process left: its changes, and the snapshot epoch they belong to (null: not recorded). */
export interface Leftover {
  epoch: number | null;
  changes: MapChange[];
}

export interface MapChange {
  start: number;
  end: number;
  redirected: boolean;
}

export class MapJournal {
  private length: number;
  private readonly record24 = new Uint8Array(RECORD);
  private readonly view = new DataView(this.record24.buffer);

  private constructor(
    readonly path: string,
    private fd: number,
    length: number,
  ) {
    this.length = length;
  }

  /**
   * The changes a previous process recorded for the store with `uuid` and did not commit; none
   * when there is no journal or it is another store's. A damaged one is an error (the daemon must
   * not guess which blocks are redirected). Reads only: the caller validates before it replays.
   */
  static leftover(path: string, uuid: Uint8Array, blocks: number): Leftover {
    if (!existsSync(path)) return { epoch: null, changes: [] };
    const bytes = readFileSync(path);
    if (!isOf(bytes, uuid)) return { epoch: null, changes: [] };
    const stored = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength).getBigUint64(24, true);
    if (stored > BigInt(Number.MAX_SAFE_INTEGER)) {
      throw new CldError('CLDD_CORRUPT', `the map journal ${path} is damaged (its header); the daemon cannot tell which blocks were redirected`);
    }
    return { epoch: stored === 0n ? null : Number(stored) - 1, changes: parseRecords(bytes, path, blocks) };
  }

  /** Whether the file at `path` is a journal of the store with `uuid`. */
  static belongsTo(path: string, uuid: Uint8Array): boolean {
    try {
      return isOf(readFileSync(path), uuid);
    } catch {
      return false;
    }
  }

  /**
   * Starts the journal of the store with `uuid` anew, holding `leftover`: until the replayed
   * changes are committed they must survive another death too. The new journal replaces the old
   * one in a rename, so a death while it is written leaves the old one, whose records are the
   * same; writing it in place would lose them in between.
   */
  static create(path: string, uuid: Uint8Array, epoch: number, leftover: readonly MapChange[]): MapJournal {
    const bytes = new Uint8Array(HEADER + RECORD * leftover.length);
    bytes.set(Buffer.from(MAGIC, 'latin1'), 0);
    bytes.set(uuid, 8);
    new DataView(bytes.buffer).setBigUint64(24, BigInt(epoch) + 1n, true);
    encodeRecords(leftover, bytes, HEADER);
    const journal = new MapJournal(path, replaceFile(path, bytes), bytes.length);
    journal.epoch = epoch;
    return journal;
  }

  record(start: number, end: number, redirected: boolean): void {
    this.view.setFloat64(0, start, true);
    this.view.setFloat64(8, end, true);
    this.record24[16] = redirected ? 1 : 0;
    this.append(this.record24);
  }

  /**
   * Appends the records of `changes` in one write: the first touches of a wake-up of a queue
   * thread are redirected together, and under TCG each write to tmpfs costs about 30 µs.
   */
  recordAll(changes: readonly MapChange[]): void {
    if (changes.length === 1) return this.record(changes[0].start, changes[0].end, changes[0].redirected);
    if (changes.length === 0) return;
    const bytes = new Uint8Array(RECORD * changes.length);
    encodeRecords(changes, bytes, 0);
    this.append(bytes);
  }

  /**
   * Writes `bytes` at the end. A full tmpfs stops a write part way: the part is cut off again, so
   * that the next record starts where the last whole one ends (a record left half written in
   * the middle would make the journal unreadable; one at the end is a death's, and skipped).
   */
  private append(bytes: Uint8Array): void {
    try {
      writeFully(this.fd, bytes, this.length);
    } catch (err) {
      try {
        ftruncateSync(this.fd, this.length);
      } catch {
        // The next append overwrites the part; a death before it leaves it at the end.
      }
      throw err;
    }
    this.length += bytes.length;
  }

  /**
   * The file to append to, for a queue thread that redirects first touches itself (under the
   * volume's map lock); -1 once closed.
   */
  get descriptor(): number {
    return this.fd;
  }

  /**
   * The journal is `length` bytes long now: records a queue thread appended (whole ones: it cuts
   * a part it could not finish off again). Called under the volume's map lock.
   */
  appendedTo(length: number): void {
    if (length < this.length || (length - this.length) % RECORD !== 0) {
      throw new CldError('EIO', `the map journal ${this.path}: a queue thread left it at ${length} bytes, it was at ${this.length}`);
    }
    this.length = length;
  }

  /** Bytes of records that no finished commit covers (a writer that never flushes adds them up). */
  get pending(): number {
    return this.length - this.committedUpTo;
  }

  /** The file's length: its header and every record not yet dropped. */
  get bytes(): number {
    return this.length;
  }

  /**
   * Why the last compaction failed, or null (none failed since the last one that worked). The
   * journal stays whole then but keeps its committed records, and grows with every first touch
   * until a state change empties it: `cldd status` says so.
   */
  get compactionError(): string | null {
    return this.compactError;
  }
  private compactError: string | null = null;

  /** Where the journal ends now: a commit that captures the map here covers every record. */
  mark(): number {
    return this.length;
  }

  /**
   * After the commit that captured at `mark`: drop the records when none came after, and record
   * the `epoch` the next ones will belong to. When some came after, drop the ones before `mark`
   * once they take COMPACT_BYTES (they are all of this epoch: a state change commits with
   * nothing in flight). `reshape` false: a later commit, captured before this trim, still runs
   * with a mark that counts the file's bytes as they are now, so the records before `mark` are
   * only counted as committed; that commit's own trim drops them.
   */
  trim(mark: number, epoch: number, reshape = true): void {
    if (!(mark >= HEADER && mark <= this.length)) {
      throw new CldError('EIO', `the map journal ${this.path}: a commit's mark ${mark} is outside its records (${HEADER}-${this.length})`);
    }
    if (!reshape) {
      this.committedUpTo = mark;
      return;
    }
    if (this.length !== mark) {
      this.committedUpTo = mark;
      if (mark - HEADER >= COMPACT_BYTES && epoch === this.epoch) this.compact(mark);
      return;
    }
    if (mark !== HEADER) ftruncateSync(this.fd, HEADER);
    this.length = HEADER;
    this.committedUpTo = HEADER;
    // Nothing left to compact: the journal is as small as it gets.
    this.compactError = null;
    if (epoch !== this.epoch) this.setEpoch(epoch);
  }

  /**
   * Rewrites the journal without the records before `mark`: the header and the records after it
   * go to PATH.new, which is renamed over PATH. Any failure leaves the journal as it was, whole,
   * to be compacted by a later commit; it is not the request's failure (its record is written).
   */
  private compact(mark: number): void {
    const kept = new Uint8Array(HEADER + this.length - mark);
    let fd: number;
    try {
      readFully(this.fd, kept, 0, HEADER, 0);
      readFully(this.fd, kept, HEADER, kept.length - HEADER, mark);
      fd = replaceFile(this.path, kept);
    } catch (err) {
      this.compactError = `${this.path}.new: ${(err as Error).message}`;
      return;
    }
    this.compactError = null;
    const replaced = this.fd;
    this.fd = fd;
    this.length = kept.length;
    this.committedUpTo = HEADER;
    try {
      closeSync(replaced);
    } catch {
      // The commit succeeded, and the journal is the new file: nothing to undo.
    }
  }

  private epoch = -1;
  /** Where the records no finished commit covers begin. */
  private committedUpTo = HEADER;

  private setEpoch(epoch: number): void {
    const field = new Uint8Array(8);
    new DataView(field.buffer).setBigUint64(0, BigInt(epoch) + 1n, true);
    writeSync(this.fd, field, 0, 8, 24);
    this.epoch = epoch;
  }

  /** Closes the journal; `remove` after a clean close, when everything is committed. */
  close(remove: boolean): void {
    if (this.fd < 0) return;
    closeSync(this.fd);
    this.fd = -1;
    if (remove) unlinkSync(this.path);
  }
}

function isOf(bytes: Uint8Array, uuid: Uint8Array): boolean {
  return (
    bytes.length >= HEADER &&
    Buffer.from(bytes.subarray(0, 8)).toString('latin1') === MAGIC &&
    Buffer.from(bytes.subarray(8, 24)).equals(Buffer.from(uuid))
  );
}

function parseRecords(bytes: Uint8Array, path: string, blocks: number): MapChange[] {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const changes: MapChange[] = [];
  // A record cut short by the death itself is not a change that completed: it is left out.
  for (let at = HEADER; at + RECORD <= bytes.length; at += RECORD) {
    const start = view.getFloat64(at, true);
    const end = view.getFloat64(at + 8, true);
    const flag = bytes[at + 16];
    const padding = bytes.subarray(at + 17, at + RECORD).some((b) => b !== 0);
    if (!Number.isSafeInteger(start) || !Number.isSafeInteger(end) || start < 0 || end <= start || end > blocks || flag > 1 || padding) {
      throw new CldError('CLDD_CORRUPT', `the map journal ${path} is damaged (record at byte ${at}); the daemon cannot tell which blocks were redirected`);
    }
    changes.push({ start, end, redirected: flag === 1 });
  }
  return changes;
}

function encodeRecords(changes: readonly MapChange[], into: Uint8Array, at: number): void {
  const view = new DataView(into.buffer, into.byteOffset, into.byteLength);
  changes.forEach((c, i) => {
    view.setFloat64(at + i * RECORD, c.start, true);
    view.setFloat64(at + i * RECORD + 8, c.end, true);
    into[at + i * RECORD + 16] = c.redirected ? 1 : 0;
  });
}

/**
 * Writes `bytes` to PATH.new and renames it over `path`: a death at any point leaves a whole
 * file at `path`, the old or the new. Returns the new file, open for reading and writing. On a
 * failure PATH.new is removed (best effort: something else there, a directory, makes it fail
 * again the next time).
 */
function replaceFile(path: string, bytes: Uint8Array): number {
  const tmp = `${path}.new`;
  // Not through a symbolic link someone left there: the journal would become its target.
  const fd = openSync(tmp, constants.O_RDWR | constants.O_CREAT | constants.O_TRUNC | constants.O_NOFOLLOW, 0o600);
  try {
    writeFully(fd, bytes, 0);
    renameSync(tmp, path);
    return fd;
  } catch (err) {
    closeSync(fd);
    try {
      rmSync(tmp, { force: true });
    } catch {
      // See above.
    }
    throw err;
  }
}

/** A write to tmpfs that runs out of space returns short; the next one says why. */
function writeFully(fd: number, bytes: Uint8Array, position: number): void {
  for (let done = 0; done < bytes.length; ) done += writeSync(fd, bytes, done, bytes.length - done, position + done);
}

function readFully(fd: number, into: Uint8Array, at: number, length: number, position: number): void {
  for (let done = 0; done < length; ) {
    const n = readSync(fd, into, at + done, length - done, position + done);
    if (n === 0) throw new Error(`the journal ended ${length - done} bytes early`);
    done += n;
  }
}
