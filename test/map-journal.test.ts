/**
 * A daemon that dies (SIGKILL) while the machine runs on: the backing store keeps every write
 * (its page cache survives the process), but map changes since the last commit lived in the
 * process. The map journal on tmpfs brings them back. A MemoryStore plays the page cache here:
 * a volume is abandoned without close, as a killed process would leave it.
 */
import { closeSync, openSync } from 'node:fs';
import { mkdir, mkdtemp, readdir, readFile, rm, stat, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, test } from 'vitest';
import { Disk, StoreExecutor } from './support/disk.js';
import { ResyncScheduler } from '../src/engine/resync.js';
import { JOURNAL_COMMIT_BYTES, Volume } from '../src/engine/volume.js';
import { mapJournalPath } from '../src/daemon/daemon.js';
import { MemoryStore } from '../src/io/memory-store.js';
import { inOrder } from '../src/io/block-store.js';
import { COMPACT_BYTES, MapJournal } from '../src/format/map-journal.js';
import { dist, limitedChild } from './support/file-limit.js';
import { PUBLISHED_WORD } from '../src/engine/publication.js';
import { addon } from '../src/native/addon.js';
import { nativePublication } from '../src/ublk/device.js';

const BS = 4096;
const fill = (v: number, blocks = 1) => new Uint8Array(blocks * BS).fill(v);
const valueOf = async (disk: Disk, b: number, target: 'master' | 'slave' = 'master') => (await disk.read(b * BS, BS, target))[0];

describe('map journal', () => {
  let dir: string;
  let journalPath: string;
  let store: MemoryStore;

  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), 'cldd-journal-'));
    journalPath = join(dir, 'pair.mapjournal');
    store = new MemoryStore(8 << 20);
    const v = await Volume.format(store);
    const d = new Disk(v);
    await d.write(0, fill(1, 8));
    await v.enable();
    await v.close();
  });

  afterEach(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  test('without the journal, a killed daemon forgets unflushed redirects (why it exists)', async () => {
    const v = await Volume.open(store);
    await new Disk(v).write(2 * BS, fill(2, 2)); // acknowledged, not flushed; the process dies
    const after = new Disk(await Volume.open(store));
    expect(await valueOf(after, 2)).toBe(1);
  });

  test('snapshot writes survive the death of the daemon', async () => {
    const v = await Volume.open(store, { journalPath });
    await new Disk(v).write(2 * BS, fill(2, 2));
    await new Disk(v).write(6 * BS, fill(3));
    // The daemon dies here: no close, no flush.
    const reopened = await Volume.open(store, { journalPath });
    const d = new Disk(reopened);
    expect(await Promise.all([0, 1, 2, 3, 4, 5, 6, 7].map((b) => valueOf(d, b)))).toEqual([1, 1, 2, 2, 1, 1, 3, 1]);
    expect(await Promise.all([0, 2, 6].map((b) => valueOf(d, b, 'slave')))).toEqual([1, 1, 1]);
    expect(reopened.map.count).toBe(3);
    // Their marks were made only in memory (a snapshot's writes wait for no commit): the replay makes them again.
    expect(reopened.tracking!.changedExtents()).toEqual([[0, 16 * BS]]);
    // The replay was committed: without the journal the store now says the same.
    await reopened.close();
    await expect(stat(journalPath)).rejects.toMatchObject({ code: 'ENOENT' });
    const plainVolume = await Volume.open(store);
    expect(plainVolume.tracking!.changedExtents()).toEqual([[0, 16 * BS]]);
    const plain = new Disk(plainVolume);
    expect(await valueOf(plain, 3)).toBe(2);
  });

  test('first touches the fast path wrote and the volume redirected in one batch survive the death of the daemon', async () => {
    const v = await Volume.open(store, { journalPath });
    // As a queue thread leaves them: written to the change area, handed over together.
    for (const [b, value] of [[1, 4], [3, 5], [5, 6]]) await store.write(fill(value), v.layout.changeOffset + b * BS);
    const results = v.finishFastRedirects([
      { offset: BS, length: BS, ok: true },
      { offset: 3 * BS, length: BS, ok: true },
      { offset: 5 * BS, length: BS, ok: false }, // its write failed: not redirected
    ]);
    expect(results).toEqual([null, null, null]);
    // One write for the batch, two records: the failed write redirects nothing.
    expect((await stat(journalPath)).size).toBe(32 + 2 * 24);
    // The daemon dies here: no close, no flush.
    const d = new Disk(await Volume.open(store, { journalPath }));
    expect(await Promise.all([0, 1, 2, 3, 4, 5].map((b) => valueOf(d, b)))).toEqual([1, 4, 1, 5, 1, 1]);
  });

  test('first touches a queue thread redirected itself survive the death of the daemon', async () => {
    const v = await Volume.open(store, { journalPath });
    const r = new (addon().Redirector)();
    const detach = v.attachRedirector(r);
    const pub = nativePublication(v, r);
    const word = (name: keyof typeof PUBLISHED_WORD) => Atomics.load(v.publication.words, PUBLISHED_WORD[name]);
    expect(word('commitPending')).toBe(0);
    // As a queue thread leaves them: written to the change area, then redirected in one go.
    for (const [b, value] of [[1, 4], [3, 5], [4, 6]]) await store.write(fill(value), v.layout.changeOffset + b * BS);
    const uuid = Buffer.from(v.status().uuid, 'hex');
    expect(r.redirect(pub, Float64Array.of(1, 2, 3, 5))).toBe(true);
    // In the order rule 4 of docs/serving.md gives: a flush now commits, the journal holds both
    // records (one write), the bits are set, and the volume has not taken them yet.
    expect(word('commitPending')).toBe(1);
    expect(word('redirected')).toBe(2);
    expect(MapJournal.leftover(journalPath, uuid, v.layout.blocks).changes).toEqual([
      { start: 1, end: 2, redirected: true },
      { start: 3, end: 5, redirected: true },
    ]);
    expect([1, 2, 3, 4].map((b) => (v.map.bits[0] >>> b) & 1)).toEqual([1, 0, 1, 1]);
    // The volume takes them at its next hold (here its status): counts, dirty pages.
    expect(v.status().redirected).toBe(3);
    expect(word('redirected')).toBe(0);
    expect(v.status().dirtyMapPages).toBe(1);
    // The daemon dies here: no close, no flush.
    const d = new Disk(await Volume.open(store, { journalPath }));
    expect(await Promise.all([0, 1, 2, 3, 4, 5].map((b) => valueOf(d, b)))).toEqual([1, 4, 1, 5, 6, 1]);
    detach();
  });

  test('first touches a queue thread redirected are committed with their chunks\' marks, and the journal cut back', async () => {
    const v = await Volume.open(store, { journalPath });
    const r = new (addon().Redirector)();
    v.attachRedirector(r);
    await store.write(fill(7), v.layout.changeOffset + 6 * BS);
    expect(r.redirect(nativePublication(v, r), Float64Array.of(6, 7))).toBe(true);
    await v.commit();
    expect(Atomics.load(v.publication.words, PUBLISHED_WORD.commitPending)).toBe(0);
    expect((await stat(journalPath)).size).toBe(32);
    // Power lost: no journal, only what the commit wrote.
    const after = await Volume.open(store);
    expect(await valueOf(new Disk(after), 6)).toBe(7);
    expect(after.tracking!.changedExtents()).toEqual([[0, 16 * BS]]);
  });

  test('a queue thread leaves the redirect to the engine when it may not, or its journal record fails', async () => {
    const v = await Volume.open(store, { journalPath });
    const r = new (addon().Redirector)();
    const pub = nativePublication(v, r);
    const one = Float64Array.of(2, 3);
    // Not attached to a volume yet.
    expect(r.redirect(pub, one)).toBe(false);
    const detach = v.attachRedirector(r);
    // The volume holds the lock.
    r.hold();
    expect(r.redirect(pub, one)).toBe(false);
    // A journal the thread cannot write: nothing redirected, the journal as it was.
    const readOnly = openSync(journalPath, 'r');
    try {
      r.release(readOnly, 32, true);
      expect(r.redirect(pub, one)).toBe(false);
    } finally {
      closeSync(readOnly);
    }
    // Nothing redirected since the last hold: nothing to take (and no array made for it).
    expect(r.hold()).toBeNull();
    r.release(-1, 32, true);
    // Not a snapshot: the bits move only in one.
    await v.disable();
    expect(r.redirect(pub, one)).toBe(false);
    await v.enable();
    // Blocks outside the volume.
    expect(r.redirect(pub, Float64Array.of(v.layout.blocks - 1, v.layout.blocks + 1))).toBe(false);
    expect(v.status().redirected).toBe(0);
    expect((await stat(journalPath)).size).toBe(32);
    // Detached (its device closed), or the volume closed.
    detach();
    expect(r.redirect(pub, one)).toBe(false);
    v.attachRedirector(r);
    await v.close();
    expect(r.redirect(pub, one)).toBe(false);
    expect(v.map.count).toBe(0);
  });

  test('resync writes and merges survive the death of the daemon', async () => {
    let v = await Volume.open(store, { journalPath });
    let d = new Disk(v);
    await d.write(0, fill(2, 4)); // redirect blocks 0..3
    await d.flush();
    await v.disable();
    // One merge of block 0 and 1, then a master write to block 2 (redirected: goes to the data
    // area and clears the bit) and to block 0 (already merged).
    const merge = (await v.beginMerge(2))!;
    const buf = new Uint8Array(merge.bufferLength);
    const ex = new StoreExecutor(store);
    await ex.run(merge.reads, buf);
    await ex.run(merge.writes, buf);
    merge.finish(true);
    await d.write(2 * BS, fill(5));
    await d.write(0, fill(6));
    // The daemon dies. The new one must not re-merge block 0 or 2 over the newer data.
    v = await Volume.open(store, { journalPath });
    d = new Disk(v);
    expect(v.state).toBe('resync');
    expect(await Promise.all([0, 1, 2, 3, 4].map((b) => valueOf(d, b)))).toEqual([6, 2, 5, 2, 1]);
    await new ResyncScheduler(v, new StoreExecutor(store)).start();
    expect(v.state).toBe('plain');
    expect(await Promise.all([0, 1, 2, 3, 4].map((b) => valueOf(d, b)))).toEqual([6, 2, 5, 2, 1]);
    await v.close();
  });

  test('a commit empties the journal; a clean close removes it', async () => {
    const v = await Volume.open(store, { journalPath });
    const d = new Disk(v);
    await d.write(2 * BS, fill(2));
    expect((await stat(journalPath)).size).toBe(32 + 24);
    await d.flush();
    expect((await stat(journalPath)).size).toBe(32);
    await v.close();
    await expect(stat(journalPath)).rejects.toMatchObject({ code: 'ENOENT' });
  });

  describe('under a writer that never pauses', () => {
    // Enough first touches before a commit that the records it covers reach COMPACT_BYTES.
    const covered = Math.ceil(COMPACT_BYTES / 24);
    let big: MemoryStore;

    beforeEach(async () => {
      big = new MemoryStore(64 << 20);
      const v = await Volume.format(big);
      await v.enable();
      await v.close();
    });

    /** First touches as a queue thread leaves them: written to the change area, then redirected. */
    async function firstTouches(v: Volume, from: number, to: number, value: number): Promise<void> {
      const blocks = Array.from({ length: to - from }, (_, i) => from + i);
      for (const b of blocks) await big.write(fill(value), v.layout.changeOffset + b * BS);
      expect(v.finishFastRedirects(blocks.map((b) => ({ offset: b * BS, length: BS, ok: true })))).toEqual(blocks.map(() => null));
    }

    /**
     * A commit of blocks [0, covered), during which five more first touches arrive: the commit
     * runs its steps only once they are in, so their records follow its mark.
     */
    async function commitWhileWriting(v: Volume): Promise<void> {
      await firstTouches(v, 0, covered, 2);
      let release!: () => void;
      const held = new Promise<void>((resolve) => (release = resolve));
      const committed = v.commit((steps) => held.then(() => inOrder(big, steps)));
      await firstTouches(v, covered, covered + 5, 3);
      release();
      await committed;
    }

    async function expectAllThere(): Promise<void> {
      const d = new Disk(await Volume.open(big, { journalPath }));
      expect(await Promise.all([0, covered - 1, covered, covered + 4, covered + 5].map((b) => valueOf(d, b)))).toEqual([2, 2, 3, 3, 0]);
      expect(d.volume.map.count).toBe(covered + 5);
    }

    test('the records a commit covered are dropped, the rest survive the death of the daemon', async () => {
      const v = await Volume.open(big, { journalPath });
      const fds = (await readdir('/proc/self/fd')).length;
      await commitWhileWriting(v);
      // Before, a commit left the journal as it was whenever records had come in while it ran.
      expect((await stat(journalPath)).size).toBe(32 + 5 * 24);
      // The header came along: the epoch the records belong to (plus one) guards the replay.
      expect((await readFile(journalPath)).readBigUInt64LE(24)).toBe(BigInt(v.epoch) + 1n);
      expect((await readdir('/proc/self/fd')).length, 'the replaced journal is closed').toBe(fds);
      await expect(stat(`${journalPath}.new`)).rejects.toMatchObject({ code: 'ENOENT' });
      // The journal goes on after the rename: the next record lands after the five.
      await firstTouches(v, covered + 10, covered + 11, 4);
      expect((await stat(journalPath)).size).toBe(32 + 6 * 24);
      // The daemon dies here: no close, no flush.
      const d = new Disk(await Volume.open(big, { journalPath }));
      expect(await Promise.all([0, covered - 1, covered, covered + 4, covered + 5, covered + 10].map((b) => valueOf(d, b)))).toEqual([2, 2, 3, 3, 0, 4]);
      expect(d.volume.map.count).toBe(covered + 6);
    });

    test('a compaction that cannot write its file leaves the journal whole, and the daemon can die at that point', async () => {
      const v = await Volume.open(big, { journalPath });
      await mkdir(`${journalPath}.new`); // openSync of PATH.new fails: EISDIR
      await commitWhileWriting(v);
      expect((await stat(journalPath)).size).toBe(32 + (covered + 5) * 24);
      // Said in the status (`cldd status` prints it): the journal now grows until a state change.
      expect(v.status().journal).toEqual({
        bytes: 32 + (covered + 5) * 24,
        uncommittedBytes: 5 * 24,
        compactionError: expect.stringMatching(/\.new: .*EISDIR/),
      });
      // The daemon dies here; the next one replays all of it.
      await rm(`${journalPath}.new`, { recursive: true });
      await expectAllThere();
    });

    test('once a compaction works again, the status no longer reports the failure', async () => {
      const v = await Volume.open(big, { journalPath });
      await mkdir(`${journalPath}.new`);
      await commitWhileWriting(v);
      expect(v.status().journal?.compactionError).toMatch(/EISDIR/);
      await rm(`${journalPath}.new`, { recursive: true });
      // The next commit covers every record so far, COMPACT_BYTES and more, while one more arrives.
      let release!: () => void;
      const held = new Promise<void>((resolve) => (release = resolve));
      const committed = v.commit((steps) => held.then(() => inOrder(big, steps)));
      await firstTouches(v, covered + 20, covered + 21, 4);
      release();
      await committed;
      expect(v.status().journal).toEqual({ bytes: 32 + 24, uncommittedBytes: 24, compactionError: null });
      await v.close();
    });

    test('a symbolic link at PATH.new is not followed: the compaction fails, the journal stays whole', async () => {
      const v = await Volume.open(big, { journalPath });
      const victim = join(dir, 'victim');
      await writeFile(victim, 'not a journal');
      await symlink(victim, `${journalPath}.new`);
      await commitWhileWriting(v);
      expect((await readFile(victim)).toString()).toBe('not a journal');
      expect((await stat(journalPath)).size).toBe(32 + (covered + 5) * 24);
      await rm(`${journalPath}.new`);
      await expectAllThere();
    });

    test('a daemon that dies while it rewrites the journal (at its start, or in a compaction) leaves the old one whole', async () => {
      const v = await Volume.open(big, { journalPath });
      await commitWhileWriting(v);
      // As a death before the rename leaves it: PATH.new written in part.
      await writeFile(`${journalPath}.new`, 'half a journal');
      await expectAllThere();
      await expect(stat(`${journalPath}.new`)).rejects.toMatchObject({ code: 'ENOENT' });
    });
  });

  test('under a writer that never flushes, the volume commits once JOURNAL_COMMIT_BYTES of records wait', async () => {
    const huge = new MemoryStore(2 * 2 ** 30);
    const v0 = await Volume.format(huge);
    await v0.enable();
    await v0.close();
    const v = await Volume.open(huge, { journalPath });
    const redirect = (from: number, to: number) =>
      expect(v.finishFastRedirects(Array.from({ length: to - from }, (_, i) => ({ offset: (from + i) * BS, length: BS, ok: true }))).every((r) => r === null)).toBe(true);
    const below = Math.floor(JOURNAL_COMMIT_BYTES / 24); // records that stay under it
    const commits = v.counters.commits;
    redirect(0, below);
    await new Promise((resolve) => setImmediate(resolve));
    expect(v.counters.commits, 'no commit below the threshold').toBe(commits);
    expect((await stat(journalPath)).size).toBe(32 + below * 24);
    redirect(below, below + 1);
    const deadline = Date.now() + 10_000;
    while ((await stat(journalPath)).size !== 32) {
      if (Date.now() > deadline) throw new Error(`the journal still holds ${(await stat(journalPath)).size} bytes 10 s after it passed the threshold: no commit emptied it`);
      await new Promise((resolve) => setTimeout(resolve, 5));
    }
    expect(v.counters.commits).toBe(commits + 1);
    // The daemon dies here: the commit holds what the journal no longer does.
    const reopened = await Volume.open(huge, { journalPath });
    expect(reopened.map.count).toBe(below + 1);
  });

  test('a record that tmpfs takes only in part is cut off, so the records after it stay readable', async () => {
    // A child whose files may hold 1024 bytes: the journal's header and 41 records fit, the 42nd
    // is written in part and fails (EFBIG here, ENOSPC on a full tmpfs). Then the limit is
    // lifted (as space is freed) and five more records go in.
    const script = `
      import { MapJournal } from ${dist('format', 'map-journal.js')};
      const j = MapJournal.create(process.argv[1], new Uint8Array(16).fill(7), 0, []);
      let ok = 0;
      try { for (;; ok++) j.record(ok, ok + 1, true); } catch (err) { console.log(ok, err.code); }
      process.stdin.once('data', () => {
        for (let i = 0; i < 5; i++) j.record(100 + i, 101 + i, true);
        console.log('done'); // and dies without closing it
        process.exit(0);
      });`;
    const child = limitedChild(1024, script, [journalPath]);
    try {
      expect(await child.line('its failed journal write')).toBe('41 EFBIG');
      await child.lift();
      child.send('go\n');
      expect(await child.line('its five more records')).toBe('done');
    } finally {
      child.kill();
    }
    const records = (from: number, n: number) => Array.from({ length: n }, (_, i) => ({ start: from + i, end: from + i + 1, redirected: true }));
    expect(MapJournal.leftover(journalPath, new Uint8Array(16).fill(7), 1000)).toEqual({ epoch: 0, changes: [...records(0, 41), ...records(100, 5)] });
  });

  /** Refuses the open, and proves that neither the store nor the journal changed. */
  async function expectStaleJournalRefused(message: RegExp): Promise<void> {
    const image = Buffer.alloc(store.size);
    store.readSync(image, 0);
    const journal = await readFile(journalPath);
    await expect(Volume.open(store, { journalPath })).rejects.toMatchObject({ code: 'CLDD_CORRUPT', message: expect.stringMatching(message) });
    const after = Buffer.alloc(store.size);
    store.readSync(after, 0);
    expect(after.equals(image), 'the store is unchanged').toBe(true);
    expect((await readFile(journalPath)).equals(journal), 'the journal is unchanged').toBe(true);
  }

  test('a journal redirecting blocks of a plain store is refused, not replayed', async () => {
    // The daemon dies in snapshot with an unflushed redirect; the store is then opened without the
    // journal, disabled and resynced to plain. The journal left behind belongs to that older history.
    const v = await Volume.open(store, { journalPath });
    await new Disk(v).write(2 * BS, fill(2));
    const other = await Volume.open(store);
    await other.disable();
    await new ResyncScheduler(other, new StoreExecutor(store)).start();
    expect(other.state).toBe('plain');
    await other.close();
    await expectStaleJournalRefused(/map journal .*pair\.mapjournal .*record 1 redirects blocks 2\.\.2, but a plain store has no redirected blocks/);
  });

  test('a journal giving a store in resync new redirected blocks is refused', async () => {
    const v = await Volume.open(store, { journalPath });
    await new Disk(v).write(6 * BS, fill(2));
    const other = await Volume.open(store);
    await new Disk(other).write(3 * BS, fill(3));
    await other.disable();
    await other.close();
    await expectStaleJournalRefused(/record 1 redirects blocks 6\.\.6, but a store in resync gains no redirected blocks/);
  });

  test('a journal taking redirected blocks from a snapshot is refused', async () => {
    let v = await Volume.open(store);
    await new Disk(v).write(2 * BS, fill(2, 2));
    await v.disable();
    await v.close();
    // In resync, a master write to block 2 clears its bit; the daemon dies before committing it.
    v = await Volume.open(store, { journalPath });
    await new Disk(v).write(2 * BS, fill(5));
    // Opened without the journal: resynced, enabled again, block 2 redirected anew.
    const other = await Volume.open(store);
    await new ResyncScheduler(other, new StoreExecutor(store)).start();
    await other.enable();
    await new Disk(other).write(2 * BS, fill(7));
    await other.close();
    await expectStaleJournalRefused(/its 1 records are of snapshot 1's period, but the store is at snapshot 2/);
  });

  test("a journal of an earlier snapshot's writes is refused in a later snapshot, where the state alone cannot tell", async () => {
    // Snapshot 1: block 3 written, not committed; the daemon dies.
    let v = await Volume.open(store, { journalPath });
    await new Disk(v).write(3 * BS, fill(3));
    // Opened without the journal (that write is lost), resynced, snapshot 2 taken: block 3 is not
    // redirected there, and a record redirecting it looks like any snapshot write.
    v = await Volume.open(store);
    await v.disable();
    await new ResyncScheduler(v, new StoreExecutor(store)).start();
    await v.untilPlain();
    await v.enable();
    await v.close();
    await expectStaleJournalRefused(/its 1 records are of snapshot 1's period, but the store is at snapshot 2/);
  });

  test("another store's journal is ignored; a damaged one is refused", async () => {
    await writeFile(journalPath, Buffer.concat([Buffer.from('cldd-mj1'), Buffer.alloc(24, 7), Buffer.alloc(24, 1)]));
    const v = await Volume.open(store, { journalPath });
    expect(v.map.count).toBe(0);
    await v.close();
    const uuid = Buffer.from(v.superblock.uuid);
    const bad = Buffer.alloc(24);
    bad.writeDoubleLE(5, 0);
    bad.writeDoubleLE(3, 8); // end before start
    await writeFile(journalPath, Buffer.concat([Buffer.from('cldd-mj1'), uuid, Buffer.alloc(8), bad]));
    await expect(Volume.open(store, { journalPath })).rejects.toMatchObject({ code: 'CLDD_CORRUPT' });
    // Every byte of a record is decoded: padding that is not zero is damage too.
    const padded = Buffer.alloc(24);
    padded.writeDoubleLE(2, 0);
    padded.writeDoubleLE(3, 8);
    padded[16] = 1;
    padded[23] = 9;
    await writeFile(journalPath, Buffer.concat([Buffer.from('cldd-mj1'), uuid, Buffer.alloc(8), padded]));
    await expect(Volume.open(store, { journalPath })).rejects.toMatchObject({ code: 'CLDD_CORRUPT', message: expect.stringMatching(/record at byte 32/) });
    await writeFile(journalPath, Buffer.concat([Buffer.from('cldd-mj1'), uuid, Buffer.alloc(8, 1)]));
    await expect(Volume.open(store, { journalPath })).rejects.toMatchObject({ code: 'CLDD_CORRUPT', message: expect.stringMatching(/its header/) });
  });
  test('the journal is named after the store: a store reopened under another pair name replays it, and none is left to replay later over a newer snapshot', async () => {
    const paths = { runDir: dir, configDir: dir };
    const as = (name: string) => ({ journalPath: (uuid: Uint8Array) => mapJournalPath(paths, name, uuid) });
    const killed = await Volume.open(store, as('a'));
    await new Disk(killed).write(2 * BS, fill(2)); // in snapshot 1, not flushed; pair "a" dies
    // The administrator brings the store back as pair "b": the change is there.
    const b = await Volume.open(store, as('b'));
    const disk = new Disk(b);
    expect(await valueOf(disk, 2)).toBe(2);
    // "b" moves on: resync, plain, a new snapshot in which block 2 is not redirected.
    await b.disable();
    await new ResyncScheduler(b, new StoreExecutor(store)).start();
    await b.untilPlain();
    await disk.write(2 * BS, fill(3));
    await b.enable();
    await b.close();
    // Opened as "a" again: no journal of the first snapshot points block 2 at stale change data.
    const a = new Disk(await Volume.open(store, as('a')));
    expect(await valueOf(a, 2)).toBe(3);
    expect(await valueOf(a, 2, 'slave')).toBe(3);
  });

  test('a journal an older cldd kept under the pair name is taken over for its store only', async () => {
    const paths = { runDir: dir, configDir: dir };
    const killed = await Volume.open(store, { journalPath: join(dir, 'old.mapjournal') }); // an older cldd, pair "old"
    await new Disk(killed).write(3 * BS, fill(4));
    const other = new MemoryStore(8 << 20);
    await (await Volume.format(other)).close();
    // Another store opened as "old" leaves that journal alone; its own store, opened as "old", replays it.
    await (await Volume.open(other, { journalPath: (uuid) => mapJournalPath(paths, 'old', uuid) })).close();
    expect((await stat(join(dir, 'old.mapjournal'))).size).toBeGreaterThan(32);
    const v = await Volume.open(store, { journalPath: (uuid) => mapJournalPath(paths, 'old', uuid) });
    expect(await valueOf(new Disk(v), 3)).toBe(4);
    await expect(stat(join(dir, 'old.mapjournal'))).rejects.toMatchObject({ code: 'ENOENT' });
  });
});
