import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { Argv, CommandModule } from 'yargs';
import { text } from '../../printable.js';
import { CldError } from '../../errors.js';
import { defaultPaths } from '../../protocol/paths.js';
import { unpersist } from '../persist.js';
import { isAlive, readState } from '../../protocol/state-file.js';
import { withPair } from '../pairs.js';
import { requireRoot } from '../root.js';

interface Args {
  pair: string;
  force: boolean;
}

export const removeCommand: CommandModule<object, Args> = {
  command: 'remove <pair>',
  describe: 'Stop a pair: flush, commit, delete its devices (the backing store keeps everything)',
  builder: (y: Argv) =>
    y
      .positional('pair', { type: 'string', demandOption: true, describe: 'pair name or one of its devices' })
      .option('force', {
        type: 'boolean',
        default: false,
        describe: 'stop even while a device is in use, finishing a running resync first',
      }) as unknown as Argv<Args>,
  handler: async (args) => {
    requireRoot('cldd remove');
    const { name, pid } = await withPair(args.pair, async (client, name) => {
      await client.request('stop', { force: args.force });
      return { name, pid: client.hello.pid };
    });
    // The daemon answers before it stops; wait for it to be gone.
    // A forced stop finishes a running resync first: that can take minutes on a large store.
    const deadline = Date.now() + 10 * 60_000;
    const paths = defaultPaths();
    const lastLine = async () => {
      const logPath = join(paths.runDir, `${name}.log`);
      const last = (await readFile(logPath, 'utf8').catch(() => '')).trim().split('\n').pop();
      return last ? `its log's last line: ${last}` : `its log (${logPath} or the journal) says why`;
    };
    while (isAlive(pid)) {
      if (Date.now() > deadline) throw new CldError('ETIMEDOUT', `the daemon of "${name}" (pid ${pid}) has not stopped within 10 min; ${await lastLine()}`);
      await new Promise((r) => setTimeout(r, 100));
    }
    // Its state file goes last, once everything is stopped: still there, the stop failed.
    if (await readState(paths, name)) {
      throw new CldError('EIO', `the daemon of "${name}" exited without stopping its devices; ${await lastLine()}; cldd add reattaches them`);
    }
    await unpersist(paths, name);
    console.log(text`${name}: removed`);
  },
};
