import type { Argv, CommandModule } from 'yargs';
import { CldError } from '../../errors.js';
import { text } from '../../printable.js';
import { formatBytes, printJson, table } from '../output.js';
import { connectPair, pairNames, resolvePair } from '../pairs.js';
import type { PairStatus } from '../../protocol/methods.js';

export type { PairStatus };

/** A request older than this is worth a line: a healthy one takes milliseconds. */
const SLOW_REQUEST_MS = 10_000;

interface Args {
  pair?: string;
  json: boolean;
}

type Unreachable = { name: string; error: string; code: string };

/**
 * Asks every named pair's daemon for its status; a pair whose daemon is gone shows as such.
 * Permission denied is not a pair's state but the caller's: it fails the whole command.
 */
export async function collect(names: string[]): Promise<(PairStatus | Unreachable)[]> {
  const all = await Promise.all(
    names.map(async (name) => {
      try {
        const client = await connectPair(name);
        try {
          return await client.request('status');
        } finally {
          client.close();
        }
      } catch (err) {
        if (err instanceof CldError && err.code === 'EACCES') return err;
        return { name, error: err instanceof Error ? err.message : String(err), code: err instanceof CldError ? err.code : 'EIO' };
      }
    }),
  );
  const denied = all.find((s) => s instanceof CldError);
  if (denied) throw denied;
  return all as (PairStatus | Unreachable)[];
}

/**
 * After the table: a daemon that answered with a malformed reply fails the command (the other
 * pairs were shown); one that is merely gone does not.
 */
function failIfMalformed(all: (PairStatus | Unreachable)[]): void {
  const bad = all.find((s): s is Unreachable => 'error' in s && s.code === 'EPROTO');
  if (bad) throw new CldError('EPROTO', bad.error);
}

function describe(s: PairStatus): string {
  const lines = [
    text`${s.name}: ${s.state}` + (s.failed ? text` (FAILED: ${s.failed})` : ''),
    text`  backing     ${s.backing}`,
    text`  master      ${s.master ?? '-'}  (${formatBytes(s.capacity)}, ${s.blockSize}-byte blocks)`,
    s.state === 'snapshot' ? text`  slave       ${s.slave} (snapshot ${s.snapshot})` : '  slave       disabled',
    text`  redirected  ${s.redirected} blocks (${formatBytes(s.redirected * s.blockSize)})`,
  ];
  if (s.tracking) {
    const t = s.tracking;
    const delta = t.deltaBytes === null ? '' : text`; snapshot ${t.since - 1} -> ${t.since}: ${formatBytes(t.deltaBytes)}`;
    lines.push(text`  changed     ${formatBytes(t.changedBytes)} since snapshot ${t.since}${delta}`);
  } else if (s.tracking === null) {
    lines.push('  changed     not tracked (format version 2 store): every backup is a full copy');
  }
  if (s.resync) {
    const eta = s.resync.secondsLeft === null ? 'unknown' : `${Math.ceil(s.resync.secondsLeft)} s`;
    lines.push(text`  resync      ${s.resync.blocksLeft} blocks left, ${formatBytes(s.resync.rate)}/s, ${eta} left`);
  }
  const r = s.requests;
  if (r && r.oldestMs !== null && r.oldestMs >= SLOW_REQUEST_MS) {
    lines.push(`  requests    ${r.outstanding} outstanding, the oldest for ${(r.oldestMs / 1000).toFixed(0)} s (the daemon's log says where they wait)`);
  }
  const j = s.journal;
  if (j?.compactionError) {
    lines.push(
      text`  journal     ${formatBytes(j.bytes)}, growing: committed records cannot be dropped (${j.compactionError}); the next enable or disable empties it`,
    );
  }
  const c = s.counters;
  lines.push(
    text`  I/O         ${c.reads} reads (${formatBytes(c.bytesRead)}), ${c.writes} writes (${formatBytes(c.bytesWritten)}), ${c.flushes} flushes, ${c.discards} discards, ${c.errors} errors${c.fastPath ? `; ${c.fastPath} of them served by the queue threads alone` : ''}`,
  );
  if (c.commits !== undefined) {
    const here = c.queueCommits ? `, ${c.queueCommits} of them built and run by a queue thread (for a flush or a FUA write)` : '';
    lines.push(text`  commits     ${c.commits}${here}`);
  }
  if (c.pollsCaught || c.pollsRanOut) {
    lines.push(text`  polls       ${c.pollsCaught ?? 0} caught a request before the queue thread slept, ${c.pollsRanOut ?? 0} ran out`);
  }
  lines.push(text`  daemon      pid ${s.pid}`);
  return lines.join('\n');
}

export const statusCommand: CommandModule<object, Args> = {
  command: 'status [pair]',
  describe: 'Show the state, devices, capacity, redirected blocks, resync progress and I/O counters',
  builder: (y: Argv) =>
    y
      .positional('pair', { type: 'string', describe: 'pair name or one of its devices (default: all)' })
      .option('json', { type: 'boolean', default: false }) as unknown as Argv<Args>,
  handler: async (args) => {
    if (args.pair) {
      const name = await resolvePair(args.pair);
      const client = await connectPair(name);
      try {
        const s = await client.request('status');
        return args.json ? printJson(s) : console.log(describe(s));
      } finally {
        client.close();
      }
    }
    const all = await collect(await pairNames());
    if (args.json) printJson(all);
    else if (all.length === 0) console.log('no cldd pairs are running');
    else console.log(all.map((s) => ('error' in s ? text`${s.name}: ${s.error}` : describe(s))).join('\n\n'));
    failIfMalformed(all);
  },
};

export const listCommand: CommandModule<object, { json: boolean }> = {
  command: 'list',
  describe: 'List the running pairs, one line each',
  builder: (y: Argv) => y.option('json', { type: 'boolean', default: false }) as unknown as Argv<{ json: boolean }>,
  handler: async (args) => {
    const all = await collect(await pairNames());
    if (args.json) {
      printJson(all);
      return failIfMalformed(all);
    }
    if (all.length === 0) return console.log('no cldd pairs are running');
    const rows = [['NAME', 'STATE', 'MASTER', 'SLAVE', 'SIZE', 'REDIRECTED', 'PID', 'BACKING']];
    for (const s of all) {
      if ('error' in s) rows.push([s.name, 'unreachable', '-', '-', '-', '-', '-', s.error]);
      else {
        rows.push([
          s.name,
          s.resync ? `resync ${s.resync.blocksLeft} left` : s.state,
          s.master ?? '-',
          s.state === 'snapshot' ? (s.slave ?? '-') : '-',
          formatBytes(s.capacity),
          String(s.redirected),
          String(s.pid),
          s.backing,
        ]);
      }
    }
    console.log(table(rows));
    failIfMalformed(all);
  },
};
