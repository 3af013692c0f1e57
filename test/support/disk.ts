/**
 * The engine served in the test process: StoreExecutor runs plans on a BlockStore, serve() is
 * the plan contract (src/engine/plan.ts) run end to end as the ublk devices run it, Disk the
 * volume's master and slave through it. For the engine tests, the daemon's tests without
 * devices and the engine benchmarks (scripts/bench/engine.ts).
 */
import { ioError } from '../../src/errors.js';
import type { Executor, IoOp, Request } from '../../src/engine/plan.js';
import type { BlockStore } from '../../src/io/block-store.js';
import { open } from 'node:fs/promises';
import { type FormatOptions, Volume } from '../../src/engine/volume.js';
import { FileStore } from '../../src/io/file-store.js';

/** Runs plans on a BlockStore. */
export class StoreExecutor implements Executor {
  constructor(private readonly store: BlockStore) {}

  async run(ops: readonly IoOp[], buffer: Uint8Array): Promise<void> {
    if (ops.length === 1) return this.runOne(ops[0], buffer);
    await Promise.all(ops.map((op) => this.runOne(op, buffer)));
  }

  private async runOne(op: IoOp, buffer: Uint8Array): Promise<void> {
    try {
      switch (op.kind) {
        case 'read':
          return await this.store.read(buffer.subarray(op.bufferOffset, op.bufferOffset + op.length), op.offset);
        case 'write':
          return await this.store.write(buffer.subarray(op.bufferOffset, op.bufferOffset + op.length), op.offset);
        case 'zero':
          return await this.store.zero(op.offset, op.length);
      }
    } catch (err) {
      throw ioError(`${op.kind} of ${op.length} bytes at ${op.offset}`, err);
    }
  }
}

/** Serves one request end to end: plan, run, finish, commit when asked. */
export async function serve(volume: Volume, executor: Executor, req: Request, buffer: Uint8Array): Promise<void> {
  const planned = volume.plan(req);
  const plan = planned instanceof Promise ? await planned : planned;
  let ok = false;
  try {
    await executor.run(plan.ops, buffer);
    ok = true;
  } finally {
    plan.finish(ok);
  }
  if (plan.commit) await volume.commit();
}

/** The volume's master and slave, read and written through serve(). */
export class Disk {
  private readonly executor: Executor;

  constructor(
    readonly volume: Volume,
    executor?: Executor,
  ) {
    this.executor = executor ?? new StoreExecutor(volume.store);
  }

  async read(offset: number, length: number, target: 'master' | 'slave' = 'master'): Promise<Uint8Array> {
    const buffer = new Uint8Array(length);
    await serve(this.volume, this.executor, { target, op: 'read', offset, length }, buffer);
    return buffer;
  }

  async write(offset: number, data: Uint8Array, options: { fua?: boolean } = {}): Promise<void> {
    await serve(this.volume, this.executor, { target: 'master', op: 'write', offset, length: data.length, fua: options.fua }, data);
  }

  async discard(offset: number, length: number, op: 'discard' | 'write-zeroes' = 'discard'): Promise<void> {
    await serve(this.volume, this.executor, { target: 'master', op, offset, length }, EMPTY);
  }

  async flush(): Promise<void> {
    await serve(this.volume, this.executor, { target: 'master', op: 'flush', offset: 0, length: 0 }, EMPTY);
  }
}

const EMPTY = new Uint8Array(0);

/**
 * Creates a sparse file of `bytes` at `path` and formats it as a cldd store; `use` may write to
 * the volume (through a Disk) before it is closed.
 */
export async function formattedFile(path: string, bytes: number, options: FormatOptions, use?: (volume: Volume) => Promise<void>): Promise<void> {
  const fh = await open(path, 'w');
  await fh.truncate(bytes);
  await fh.close();
  const store = await FileStore.open(path);
  const volume = await Volume.format(store, options);
  await use?.(volume);
  await volume.close();
  await store.close();
}
