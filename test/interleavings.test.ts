/**
 * The engine under many concurrent requests whose steps complete in random orders: every store
 * operation (data extents, commit writes and flushes, merge copies) and every step an executor
 * takes (running a plan's extents, calling finish, committing) is held until a seeded scheduler
 * releases it, while enable, disable and resync merges run in between. Two things must hold:
 *   - liveness: whenever requests are outstanding, something is runnable. A request waiting with
 *     nothing runnable (a lost wake-up, a lock or commit that waits on itself, a drain that never
 *     ends) fails the trial with the seed and where every request is stuck;
 *   - what completes is right: reads see the last completed write of each block, slave reads the
 *     enable-time image (requests never overlap a write in flight, so the expected value is one).
 * Every other trial puts the queue threads' fast path in front of the engine (support/fast-path.ts):
 * the requests it decides run their I/O held like the rest, so state changes must turn it off
 * and wait for them, in any order, without missing one or waiting forever. Of those, every other
 * one redirects first touches as a master's queue thread does (the addon's Redirector), the rest
 * through the engine's finishFastRedirect.
 * Replay a failure with CLDD_SEED=<seed>; scale with CLDD_INTERLEAVINGS=<trials>.
 */
import { expect, test } from 'vitest';
import type { Plan, Request } from '../src/engine/plan.js';
import { Volume } from '../src/engine/volume.js';
import type { BlockStore } from '../src/io/block-store.js';
import { MemoryStore } from '../src/io/memory-store.js';
import { between, pick, rng, seedFromEnv } from './support/random.js';
import { FastPath } from './support/fast-path.js';
import { SECTOR, stamped, versionOf } from './support/stamp.js';

const BS = 4096;
const SPB = BS / SECTOR;

/** A step the scheduler releases: a store operation or an executor's step. */
interface Held {
  what: string;
  release(): void;
}

/** A memory store whose every operation waits for the scheduler. */
class HeldStore implements BlockStore {
  readonly description = 'held memory';
  constructor(
    readonly inner: MemoryStore,
    private readonly hold: (what: string) => Promise<void>,
  ) {}
  get size(): number {
    return this.inner.size;
  }
  async read(buffer: Uint8Array, offset: number): Promise<void> {
    await this.hold(`store read of ${buffer.length} at ${offset}`);
    await this.inner.read(buffer, offset);
  }
  async write(data: Uint8Array, offset: number): Promise<void> {
    await this.hold(`store write of ${data.length} at ${offset}`);
    await this.inner.write(data.slice(), offset);
  }
  async zero(offset: number, length: number): Promise<void> {
    await this.hold(`store zero of ${length} at ${offset}`);
    await this.inner.zero(offset, length);
  }
  async flush(): Promise<void> {
    await this.hold('store flush');
  }
  close(): Promise<void> {
    return Promise.resolve();
  }
}

class Trial {
  private readonly held: Held[] = [];
  /** What each outstanding actor (request, state change, merger) is doing now. */
  private readonly actors = new Map<number, string>();
  private nextActor = 0;
  private version = 0;
  volume!: Volume;
  store!: HeldStore;
  blocks = 0;
  /** Per block: the version of the last completed master write (0: zeros). */
  private master!: Int32Array;
  private slave: Int32Array | null = null;
  /** Blocks with a write in flight (no other request may touch them) or a read (no write may). */
  private writing!: Uint8Array;
  private reading!: Uint16Array;
  private changing = false;
  private merging = false;
  private closing = false;
  failures: string[] = [];
  steps = 0;
  completed = 0;
  stateChanges = 0;
  merges = 0;

  private fast: FastPath | null = null;
  get redirectedHere(): number {
    return this.fast?.redirectedHere ?? 0;
  }
  get redirectedByEngine(): number {
    return this.fast?.redirectedByEngine ?? 0;
  }
  /** FUA writes committed on their thread, and those it began and handed to the engine. */
  get fuaCommitsHere(): number {
    return this.fast?.fuaCommitsHere ?? 0;
  }
  get fuaToEngine(): number {
    return this.fast?.toEngine ?? 0;
  }
  /** Every block a write or discard was issued for (what the slave audit reads). */
  private readonly touched = new Set<number>();
  fastServed = 0;
  /** Flushes whose map commit the redirector built, as a queue thread's CaptureCommit does. */
  commitsHere = 0;

  constructor(
    private readonly random: () => number,
    private readonly maxConcurrent: number,
    private readonly withFastPath: boolean,
    private readonly nativeRedirects = true,
    /**
     * Only requests the fast path serves by itself (reads, writes, FUA writes, flushes):
     * between state changes and merges, a flush or a FUA write then often finds only the
     * threads' redirects to commit, and its queue thread commits them; with the engine's
     * requests beside them it seldom does.
     */
    private readonly quiet = false,
  ) {}

  private hold = (what: string): Promise<void> =>
    new Promise((resolve) => this.held.push({ what, release: resolve }));

  async start(): Promise<void> {
    const inner = new MemoryStore(24 << 20);
    const direct = await Volume.format(inner, { blockSize: BS, name: 'interleave' });
    await direct.close();
    this.store = new HeldStore(inner, this.hold);
    const opening = Volume.open(this.store);
    await this.settle(() => opening);
    this.volume = await opening;
    if (this.withFastPath) this.fast = new FastPath(this.volume, this.store, this.hold, undefined, this.nativeRedirects);
    this.blocks = this.volume.layout.blocks;
    this.master = new Int32Array(this.blocks);
    this.writing = new Uint8Array(this.blocks);
    this.reading = new Uint16Array(this.blocks);
  }

  /** Releases held steps at random until `until` settles (for setup and teardown). */
  private async settle(until: () => Promise<unknown>): Promise<void> {
    let done = false;
    until().then(
      () => (done = true),
      () => (done = true),
    );
    for (let i = 0; !done && i < 100_000; i++) {
      await idle();
      if (done) break;
      if (this.held.length === 0) throw new Error('setup is waiting with nothing runnable');
      this.held.splice(Math.floor(this.random() * this.held.length), 1)[0].release();
    }
  }

  private actor(label: string, body: (at: (stage: string) => void) => Promise<void>): void {
    const id = this.nextActor++;
    this.actors.set(id, `${label}: starting`);
    const at = (stage: string) => this.actors.set(id, `${label}: ${stage}`);
    body(at)
      .catch((err) => {
        // What was waiting when the volume closed is refused, as the daemon's devices are stopped.
        if (this.closing && (err as { code?: string }).code === 'CLDD_CLOSED') return;
        this.failures.push(`${label}: ${err instanceof Error ? err.message : String(err)}`);
      })
      .finally(() => {
        this.actors.delete(id);
        this.completed++;
      });
  }

  /** Serves one request as an executor does, each step held: plan, extents, finish, commit. */
  private serve(label: string, req: Request, buffer: Uint8Array, at: (stage: string) => void): Promise<void> {
    return (async () => {
      const fast = this.fast?.tryServe(req, buffer);
      if (fast) {
        at('served by the fast path');
        this.fastServed++;
        // A FUA write whose redirect or commit its thread could not make: the engine's, from the start.
        if ((await fast) === 'done') return;
        at('handed to the engine by the fast path');
      }
      // A master flush with only the threads' redirects to commit: its queue thread commits them.
      const committing = req.op === 'flush' && req.target === 'master' ? this.fast?.commitHere() : undefined;
      if (committing) {
        at('committing on its queue thread');
        if (await committing) {
          this.commitsHere++;
          return;
        }
      }
      at('planning');
      const planned = this.volume.plan(req);
      let plan: Plan;
      if (planned instanceof Promise) {
        at('waiting to be planned');
        plan = await planned;
      } else plan = planned;
      at('waiting to run its extents');
      await this.hold(`${label}: run extents`);
      at('running its extents');
      let ok = false;
      try {
        await Promise.all(
          plan.ops.map((op) => {
            const part = buffer.subarray(op.bufferOffset, op.bufferOffset + op.length);
            if (op.kind === 'read') return this.store.read(part, op.offset);
            if (op.kind === 'write') return this.store.write(part, op.offset);
            return this.store.zero(op.offset, op.length);
          }),
        );
        ok = true;
      } finally {
        at('waiting to finish');
        await this.hold(`${label}: finish`);
        plan.finish(ok);
      }
      if (plan.commit) {
        at('waiting for the commit');
        await this.volume.commit();
      }
    })();
  }

  /** Picks a free range of `n` blocks no write (and, for a write, no read) holds; null if none. */
  private range(n: number, forWrite: boolean): [number, number] | null {
    for (let tries = 0; tries < 8; tries++) {
      // Mostly a small window, so that requests meet redirected blocks, merges and each other.
      const start = between(this.random, 0, (this.random() < 0.9 ? 48 : this.blocks) - n);
      let free = true;
      for (let b = start; b < start + n && free; b++) free = !this.writing[b] && (!forWrite || this.reading[b] === 0);
      if (free) return [start, start + n];
    }
    return null;
  }

  private startRequest(): void {
    const state = this.volume.state;
    const kind = pick(this.random, this.quiet ? ['read', 'write', 'write', 'fua', 'flush', 'slave'] : ['read', 'read', 'write', 'write', 'write', 'fua', 'flush', 'discard', 'slave']);
    const n = between(this.random, 1, 4);
    if (kind === 'flush') {
      this.actor('flush', (at) => this.serve('flush', { target: 'master', op: 'flush', offset: 0, length: 0 }, new Uint8Array(0), at));
      return;
    }
    const r = this.range(n, kind !== 'read' && kind !== 'slave');
    if (!r) return;
    const [start, end] = r;
    const label = `${kind} of blocks ${start}-${end - 1}`;
    if (kind === 'read' || kind === 'slave') {
      if (kind === 'slave' && (state !== 'snapshot' || !this.slave)) return;
      const expected = kind === 'slave' ? this.slave!.slice(start, end) : null;
      for (let b = start; b < end; b++) this.reading[b]++;
      const buffer = new Uint8Array((end - start) * BS);
      this.actor(label, async (at) => {
        try {
          await this.serve(label, { target: kind === 'slave' ? 'slave' : 'master', op: 'read', offset: start * BS, length: buffer.length }, buffer, at);
        } catch (err) {
          // A slave read waiting while disable runs finds no slave once it may go on.
          if (kind === 'slave' && (err as { code?: string }).code === 'ENODEV') return;
          throw err;
        } finally {
          for (let b = start; b < end; b++) this.reading[b]--;
        }
        const want = expected ?? this.master.slice(start, end);
        for (let b = start; b < end; b++) {
          const got = versionOf(buffer, (b - start) * BS, b * SPB);
          if (got !== want[b - start]) throw new Error(`block ${b} read version ${got}, expected ${want[b - start]}`);
        }
      });
      return;
    }
    for (let b = start; b < end; b++) {
      this.writing[b] = 1;
      this.touched.add(b);
    }
    const version = kind === 'discard' ? 0 : ++this.version;
    const data = kind === 'discard' ? new Uint8Array(0) : stamped(start * SPB, (end - start) * SPB, version);
    const req: Request =
      kind === 'discard'
        ? { target: 'master', op: 'discard', offset: start * BS, length: (end - start) * BS }
        : { target: 'master', op: 'write', offset: start * BS, length: data.length, fua: kind === 'fua' };
    this.actor(label, async (at) => {
      try {
        await this.serve(label, req, data, at);
        for (let b = start; b < end; b++) this.master[b] = version;
      } finally {
        for (let b = start; b < end; b++) this.writing[b] = 0;
      }
    });
  }

  private startStateChange(): void {
    const state = this.volume.state;
    this.changing = true;
    if (state === 'snapshot') {
      this.actor('disable', async (at) => {
        try {
          await this.auditSlave();
          at('disabling');
          await this.volume.disable();
          this.slave = null;
          this.stateChanges++;
        } finally {
          this.changing = false;
        }
      });
    } else {
      this.actor('enable', async (at) => {
        try {
          at(state === 'resync' ? 'enabling, waiting for the resync' : 'enabling');
          await this.volume.enable({ wait: true });
          // Writes still in flight now were held at the gate: they go to the change area.
          this.slave = this.master.slice();
          this.stateChanges++;
        } finally {
          this.changing = false;
        }
      });
    }
  }

  /** The resync scheduler's loop, each step held. */
  private startMerger(): void {
    this.merging = true;
    this.actor('merger', async (at) => {
      try {
        for (;;) {
          at('beginning a merge');
          if (this.closing) return; // the daemon stops its scheduler before it closes the volume
          const merge = await this.volume.beginMerge(between(this.random, 1, 8));
          if (!merge) return;
          const buffer = new Uint8Array(merge.bufferLength);
          let ok = false;
          try {
            at(`copying blocks ${merge.start}-${merge.end - 1}`);
            await Promise.all(merge.reads.map((op) => this.store.read(buffer.subarray(op.bufferOffset, op.bufferOffset + op.length), op.offset)));
            await Promise.all(merge.writes.map((op) => this.store.write(buffer.subarray(op.bufferOffset, op.bufferOffset + op.length), op.offset)));
            ok = true;
          } finally {
            await this.hold(`merge ${merge.start}-${merge.end - 1}: finish`);
            merge.finish(ok);
            this.merges++;
          }
        }
      } finally {
        this.merging = false;
      }
    });
  }

  /**
   * In snapshot nothing may write the data area: it must hold the enable-time image, whatever is
   * in flight. Read straight from the memory under the held store, so it checks every block at
   * once (a write that landed after the enable, say one the fast path decided before it).
   */
  private async auditSlave(): Promise<void> {
    if (this.volume.state !== 'snapshot' || !this.slave) return;
    const { dataOffset } = this.volume.layout;
    const block = new Uint8Array(BS);
    for (const b of this.touched) {
      await this.store.inner.read(block, dataOffset + b * BS);
      const got = versionOf(block, 0, b * SPB);
      if (got !== this.slave[b]) throw new Error(`the slave drifted: block ${b} of the data area holds version ${got}, the enable-time image ${this.slave[b]}`);
    }
  }

  private stuck(): string {
    return [...this.actors.values()].slice(0, 12).join('; ') + (this.actors.size > 12 ? `; and ${this.actors.size - 12} more` : '');
  }

  /**
   * Runs `actions` scheduler decisions, then closes the volume (at once, with requests and a
   * merge in flight, or once they are done) and lets everything finish; throws on a stall.
   */
  async run(actions: number): Promise<void> {
    const closeEarly = this.random() < 0.5;
    for (let i = 0; ; i++) {
      await idle();
      if (this.failures.length) throw new Error(this.failures[0]);
      // Draining takes far fewer steps than this; more means something spins without finishing.
      if (i > actions + 100_000) throw new Error(`still not done after ${i} steps: ${this.stuck()}`);
      const starting = i < actions;
      if (!starting && !this.closing && (closeEarly || this.actors.size === 0)) {
        this.closing = true;
        this.actor('close', async (at) => {
          at('closing');
          await this.volume.close();
        });
        // Its first steps run as promise reactions: let them, before looking for what is runnable.
        continue;
      }
      const choices: (() => void)[] = [];
      if (starting && this.actors.size < this.maxConcurrent) choices.push(() => this.startRequest(), () => this.startRequest());
      if (starting && !this.changing && this.random() < 0.05) choices.push(() => this.startStateChange());
      if (!this.merging && !this.closing && this.volume.state === 'resync') choices.push(() => this.startMerger());
      for (let k = 0; k < Math.min(this.held.length, 4); k++) {
        choices.push(() => this.held.splice(Math.floor(this.random() * this.held.length), 1)[0].release());
      }
      if (choices.length === 0) {
        if (this.actors.size === 0 && this.closing) break;
        throw new Error(`${this.actors.size} waiting with nothing runnable: ${this.stuck()}`);
      }
      pick(this.random, choices)();
      this.steps++;
    }
    if (this.failures.length) throw new Error(this.failures[0]);
  }
}

/** Lets every promise reaction that can run, run. */
async function idle(): Promise<void> {
  for (let i = 0; i < 3; i++) await new Promise<void>((resolve) => setImmediate(resolve));
}

test('concurrent requests in random interleavings with state changes and merges never wait with nothing runnable', async () => {
  const seed = seedFromEnv();
  const trials = Number(process.env.CLDD_INTERLEAVINGS) || 400;
  console.log(`interleavings: seed ${seed} (replay with CLDD_SEED=${seed})`);
  let steps = 0;
  let requests = 0;
  let stateChanges = 0;
  let merges = 0;
  let fastServed = 0;
  let redirectedHere = 0;
  let redirectedByEngine = 0;
  let commitsHere = 0;
  let fuaCommitsHere = 0;
  let fuaToEngine = 0;
  for (let t = 0; t < trials; t++) {
    const trialSeed = (seed + t * 0x9e3779b1) >>> 0;
    // A quiet trial runs few requests at once: a flush beside another one goes to the engine,
    // which then has the threads' redirects to commit itself.
    const quiet = t % 8 === 5;
    const trial = new Trial(rng(trialSeed), quiet ? between(rng(trialSeed ^ 1), 1, 3) : between(rng(trialSeed ^ 1), 4, 48), t % 2 === 1, t % 4 === 1, quiet);
    await trial.start();
    try {
      await trial.run(400);
    } catch (err) {
      throw new Error(`trial ${t} (CLDD_SEED=${seed}, trial seed ${trialSeed}), step ${trial.steps}: ${(err as Error).message}`);
    }
    steps += trial.steps;
    requests += trial.completed;
    stateChanges += trial.stateChanges;
    merges += trial.merges;
    fastServed += trial.fastServed;
    redirectedHere += trial.redirectedHere;
    redirectedByEngine += trial.redirectedByEngine;
    commitsHere += trial.commitsHere;
    fuaCommitsHere += trial.fuaCommitsHere;
    fuaToEngine += trial.fuaToEngine;
  }
  console.log(`interleavings: ${trials} trials, ${steps} scheduler steps, ${requests} actors, ${stateChanges} state changes, ${merges} merges, ${fastServed} requests served by the fast path, first touches redirected by the redirector ${redirectedHere} and by the engine ${redirectedByEngine}, ${commitsHere} map commits built for a flush by the redirector, ${fuaCommitsHere} for a FUA write (${fuaToEngine} FUA writes begun on the fast path and handed to the engine)`);
  expect(stateChanges).toBeGreaterThan(trials);
  expect(merges).toBeGreaterThan(trials);
  expect(fastServed).toBeGreaterThan(trials);
  expect(redirectedHere, 'first touches the redirector took').toBeGreaterThan(trials / 4);
  expect(redirectedByEngine, 'first touches the engine redirected').toBeGreaterThan(trials / 4);
  expect(commitsHere, 'map commits the redirector built for a flush').toBeGreaterThan(trials / 16);
  expect(fuaCommitsHere, 'map commits the redirector built for a FUA write').toBeGreaterThan(trials / 16);
  expect(fuaToEngine, 'FUA writes handed to the engine after their write').toBeGreaterThan(0);
}, 120_000);
