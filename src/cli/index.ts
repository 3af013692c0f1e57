/**
 * The cldd command line: one yargs command module per file under commands/, registered here.
 * Errors are one line on stderr ending with their code, and a non-zero exit status: 2 for a
 * usage error (EINVAL: an unknown option, a missing value), 1 for the others.
 */
import yargs from 'yargs';
import { hideBin } from 'yargs/helpers';
import { addCommand } from './commands/add.js';
import { backupCommand } from './commands/backup.js';
import { changesCommand } from './commands/changes.js';
import { checkCommand } from './commands/check.js';
import { daemonCommand } from './commands/daemon.js';
import { removeCommand } from './commands/remove.js';
import { disableCommand } from './commands/disable.js';
import { enableCommand } from './commands/enable.js';
import { listCommand, statusCommand } from './commands/status.js';
import { ExitCode, printError, USAGE_EXIT, UsageError } from './output.js';

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
      .command(changesCommand)
      .command(backupCommand)
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
        // yargs' own complaints (YError: "Not enough arguments following: size") are usage
        // errors like those it passes as a message; a command's error is passed through.
        if (err && err.name !== 'YError') throw err;
        throw new UsageError(message ?? err.message);
      })
      .parseAsync();
  } catch (err) {
    if (err instanceof ExitCode) return err.code;
    printError('cldd', err);
    return err instanceof UsageError ? USAGE_EXIT : 1;
  }
  return failed ? 1 : 0;
}

if (import.meta.url === `file://${process.argv[1]}`) {
  main(hideBin(process.argv)).then((code) => process.exit(code));
}
