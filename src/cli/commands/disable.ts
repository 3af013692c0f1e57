import type { Argv, CommandModule } from 'yargs';
import { text } from '../../printable.js';
import { printJson } from '../output.js';
import { withPair } from '../pairs.js';
import { followResync } from '../progress.js';
import { requireRoot } from '../root.js';

interface Args {
  pair: string;
  wait: boolean;
  json: boolean;
}

export const disableCommand: CommandModule<object, Args> = {
  command: 'disable <pair>',
  describe: 'Drop the slave and merge the changes back into the data area in the background',
  builder: (y: Argv) =>
    y
      .positional('pair', { type: 'string', demandOption: true, describe: 'pair name or one of its devices' })
      .option('wait', { type: 'boolean', default: false, describe: 'wait for the resync, showing its progress' })
      .option('json', { type: 'boolean', default: false }) as unknown as Argv<Args>,
  handler: async (args) => {
    requireRoot('cldd disable');
    await withPair(args.pair, async (client, name) => {
      const result = await client.request('disable');
      if (args.json && !args.wait) return printJson(result);
      if (!args.json) console.log(text`${name}: slave disabled; ${result.blocks} blocks to merge back`);
      if (args.wait) {
        await followResync(client, result.blocks, args.json ? process.stderr : process.stdout);
        if (args.json) printJson({ ...result, state: 'plain' });
      }
    });
  },
};
