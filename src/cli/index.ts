/**
 * The cldd command line: one yargs command module per file under commands/, registered here.
 * Errors are one line on stderr and a non-zero exit status.
 */
import yargs from 'yargs';
import { hideBin } from 'yargs/helpers';
import { addCommand } from './commands/add.js';
import { checkCommand } from './commands/check.js';
import { daemonCommand } from './commands/daemon.js';
import { removeCommand } from './commands/remove.js';
import { disableCommand } from './commands/disable.js';
import { enableCommand } from './commands/enable.js';
import { listCommand, statusCommand } from './commands/status.js';
import { ExitCode, printError } from './output.js';

export async function main(argv: string[]): Promise<number> {
  let failed = false;
  try {
    await yargs(argv)
      .scriptName('cldd')
      .usage('$0 <command> [options]\n\nA checkpointed logical disk: a master block device and a point-in-time slave.')
      .command(addCommand)
      .command(enableCommand)
      .command(disableCommand)
      .command(statusCommand)
      .command(listCommand)
      .command(removeCommand)
      .command(checkCommand)
      .command(daemonCommand)
      .demandCommand(1, 'name a command (see --help)')
      .strict()
      .help()
      .alias('h', 'help')
      .version()
      .wrap(process.stdout.isTTY ? Math.min(100, process.stdout.columns) : null)
      .fail((message, err) => {
        failed = true;
        if (err) throw err;
        throw new UsageError(message);
      })
      .parseAsync();
  } catch (err) {
    if (err instanceof ExitCode) return err.code;
    printError('cldd', err);
    return err instanceof UsageError ? 2 : 1;
  }
  return failed ? 1 : 0;
}

class UsageError extends Error {}

if (import.meta.url === `file://${process.argv[1]}`) {
  main(hideBin(process.argv)).then((code) => process.exit(code));
}
