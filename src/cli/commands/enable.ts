import type { Argv, CommandModule } from 'yargs';
import { text } from '../../printable.js';
import { parsePath } from '../options.js';
import { printJson } from '../output.js';
import { withPair } from '../pairs.js';
import { followResync } from '../progress.js';
import { requireRoot } from '../root.js';

interface Args {
  pair: string;
  freeze?: string;
  'no-freeze': boolean;
  wait: boolean;
  json: boolean;
}

export const enableCommand: CommandModule<object, Args> = {
  command: 'enable <pair>',
  describe: 'Take the snapshot: the slave shows the master as it is now (the mounted filesystem is frozen for the switch)',
  builder: (y: Argv) =>
    y
      .positional('pair', { type: 'string', demandOption: true, describe: 'pair name or one of its devices' })
      .option('freeze', { type: 'string', describe: 'mountpoint to freeze (default: wherever the master is mounted)' })
      .option('no-freeze', { type: 'boolean', default: false, describe: 'do not freeze the filesystem' })
      .option('wait', { type: 'boolean', default: false, describe: 'if a resync is running, wait for it instead of refusing' })
      .option('json', { type: 'boolean', default: false }) as unknown as Argv<Args>,
  handler: async (args) => {
    // An empty --freeze would resolve to the working directory: refused like any empty path.
    // yargs reads --no-freeze as the negation of --freeze (freeze = false), not as its own option.
    const freeze = typeof args.freeze === 'string' ? parsePath('--freeze', args.freeze) : '';
    const noFreeze = args['no-freeze'] || (args.freeze as unknown) === false;
    requireRoot('cldd enable');
    const result = await withPair(args.pair, async (client) => {
      if (args.wait) {
        // Follow a running resync here, where its progress shows and a stall is noticed, then
        // enable as usual (the daemon waits too, should one be between the two).
        const p = await client.request('progress', { waitMs: undefined });
        if (p.state === 'resync') await followResync(client, p.blocksLeft, process.stderr);
      }
      return client.request('enable', { freeze, noFreeze, wait: args.wait });
    });
    if (args.json) return printJson(result);
    const frozen = result.frozen ? text`; ${result.frozen} was frozen for ${(result.frozenMs ?? 0).toFixed(1)} ms` : '';
    console.log(text`snapshot ${result.epoch} taken` + frozen);
  },
};
