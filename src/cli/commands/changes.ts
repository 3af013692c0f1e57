import type { Argv, CommandModule } from 'yargs';
import type { DaemonClient } from '../../protocol/client.js';
import type { Result } from '../../protocol/methods.js';
import { text } from '../../printable.js';
import { formatBytes, printJson, table, UsageError } from '../output.js';
import { withPair } from '../pairs.js';
import { requireRoot } from '../root.js';

interface Args {
  pair: string;
  since?: number;
  json: boolean;
}

export type Changes = Omit<Result<'changes'>, 'next'>;

/** Every extent that differs between snapshot `since` and the enabled one, page by page. */
export async function fetchChanges(client: DaemonClient, since?: number): Promise<Changes> {
  const first = await client.request('changes', { since, after: undefined });
  const extents = [...first.extents];
  let next = first.next;
  while (next !== null) {
    const page = await client.request('changes', { since: first.since, after: next });
    extents.push(...page.extents);
    next = page.next;
  }
  const { next: _, ...rest } = first;
  return { ...rest, extents };
}

export function describeChanges(name: string, c: Changes): string {
  const share = c.capacity > 0 ? ((100 * c.changedBytes) / c.capacity).toFixed(2) : '0';
  const head = c.available
    ? text`${name}: snapshot ${c.since} -> ${c.snapshot}: ${c.extents.length} extents, ${formatBytes(c.changedBytes)} of ${formatBytes(c.capacity)} changed (${share}%, ${formatBytes(c.chunkSize)} chunks)`
    : text`${name}: snapshot ${c.since} -> ${c.snapshot}: not tracked (${c.reason ?? 'unknown'}): everything changed, ${formatBytes(c.capacity)}`;
  if (c.extents.length === 0) return head;
  return `${head}\n${table([['OFFSET', 'LENGTH'], ...c.extents.map(([o, l]) => [String(o), String(l)])])}`;
}

export const changesCommand: CommandModule<object, Args> = {
  command: 'changes <pair>',
  describe: 'List the extents (byte offset, length) that differ between an earlier snapshot and the enabled one',
  builder: (y: Argv) =>
    y
      .positional('pair', { type: 'string', demandOption: true, describe: 'pair name or one of its devices' })
      .option('since', { type: 'number', describe: 'the earlier snapshot (default: the one before the enabled snapshot)' })
      .option('json', { type: 'boolean', default: false }) as unknown as Argv<Args>,
  handler: async (args) => {
    if (args.since !== undefined && !(Number.isSafeInteger(args.since) && args.since >= 0)) {
      throw new UsageError(`--since must be a snapshot number (a whole number from 0), not ${String(args.since)}`);
    }
    requireRoot('cldd changes');
    await withPair(args.pair, async (client, name) => {
      const c = await fetchChanges(client, args.since);
      if (args.json) printJson(c);
      else console.log(describeChanges(name, c));
    });
  },
};
