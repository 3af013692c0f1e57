/**
 * A minimal serving process (the real daemon and CLI come later): serves one backing file as
 * /dev/ublkbN (master) and, while enabled, a slave device.
 *
 *   node dist/ublk/serve-main.js BACKING [--queues N] [--depth N] [--recover MASTER_ID[,SLAVE_ID]]
 *
 * A backing file that is all zeros at the start is formatted; one that holds something else is
 * refused. When the devices are ready it prints one JSON line ({"event":"ready", master, ...}).
 * SIGUSR1 enables the slave, SIGUSR2 disables it (each prints a JSON line); SIGTERM or SIGINT
 * stops cleanly (STOP_DEV, drain, DEL_DEV). After a SIGKILL the devices stay; --recover with
 * their ids takes them over. Errors: one line on stderr and exit status 1.
 */
import { CldError } from '../errors.js';
import { Volume } from '../engine/volume.js';
import { NativeStore } from '../store/native-store.js';
import { DeviceServer } from './server.js';

interface Args {
  backing: string;
  queues?: number;
  depth?: number;
  recover?: { masterId: number; slaveId?: number };
}

function parseArgs(argv: string[]): Args {
  let backing: string | undefined;
  const args: Partial<Args> = {};
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const value = () => {
      const v = argv[++i];
      if (v === undefined) throw new CldError('EINVAL', `${a} needs a value`);
      return v;
    };
    const int = (v: string) => {
      const n = Number(v);
      if (!Number.isInteger(n) || n < 0) throw new CldError('EINVAL', `${a}: ${v} is not a count`);
      return n;
    };
    if (a === '--queues') args.queues = int(value());
    else if (a === '--depth') args.depth = int(value());
    else if (a === '--recover') {
      const [m, s] = value().split(',');
      args.recover = { masterId: int(m), slaveId: s === undefined ? undefined : int(s) };
    } else if (a.startsWith('-')) throw new CldError('EINVAL', `unknown option ${a}`);
    else if (backing === undefined) backing = a;
    else throw new CldError('EINVAL', `unexpected argument ${a}`);
  }
  if (!backing) throw new CldError('EINVAL', 'usage: serve-main BACKING [--queues N] [--depth N] [--recover MASTER[,SLAVE]]');
  return { ...args, backing };
}

async function openVolume(store: NativeStore): Promise<Volume> {
  try {
    return await Volume.open(store);
  } catch (err) {
    if ((err as CldError).code !== 'CLDD_FOREIGN') throw err;
    const head = new Uint8Array(Math.min(store.size, 64 << 10));
    await store.read(head, 0);
    if (head.some((b) => b !== 0)) {
      throw new CldError('CLDD_FOREIGN', `${store.description} holds data that is not a cldd store; refusing to format it`);
    }
    return Volume.format(store);
  }
}

function say(event: string, fields: object): void {
  process.stdout.write(`${JSON.stringify({ event, ...fields })}\n`);
}

async function main(): Promise<void> {
  const args = parseArgs(process.argv.slice(2));
  const store = NativeStore.open(args.backing, { lock: true });
  let server: DeviceServer;
  try {
    const volume = await openVolume(store);
    const options = { queues: args.queues, depth: args.depth };
    server = args.recover ? await DeviceServer.recover(volume, store, args.recover, options) : await DeviceServer.start(volume, store, options);
  } catch (err) {
    await store.close();
    throw err;
  }
  let stopping = false;
  const stop = (signal: string) => {
    if (stopping) return;
    stopping = true;
    server
      .stop()
      .then(() => store.close())
      .then(
        () => {
          say('stopped', { signal });
          process.exit(0);
        },
        (err) => fail(err),
      );
  };
  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGINT', () => stop('SIGINT'));
  process.on('SIGUSR1', () => {
    server.enable().then(
      () => say('enabled', server.status()),
      (err) => say('error', { op: 'enable', code: err.code, message: err.message }),
    );
  });
  process.on('SIGUSR2', () => {
    server.disable().then(
      () => say('disabled', server.status()),
      (err) => say('error', { op: 'disable', code: err.code, message: err.message }),
    );
  });
  if (process.env.CLDD_STATS) {
    // Measurement aid: the master's ring counters once a second, on stderr.
    setInterval(() => process.stderr.write(`${JSON.stringify({ t: Date.now(), ...server.masterStats() })}\n`), 1000).unref();
  }
  say('ready', { pid: process.pid, recovered: args.recover !== undefined, ...server.status() });
}

function fail(err: unknown): never {
  const e = err as { code?: string; message?: string };
  process.stderr.write(`serve: ${e.code ?? 'EIO'}: ${e.message ?? String(err)}\n`);
  process.exit(1);
}

main().catch(fail);
