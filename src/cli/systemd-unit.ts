import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const TEMPLATE = fileURLToPath(new URL('../../scripts/systemd/cldd@.service', import.meta.url));

/** The project's directory (the one holding bin/ and dist/), from this module's place in dist/ or src/. */
export const CLDD_HOME = fileURLToPath(new URL('../..', import.meta.url)).replace(/\/$/, '');

/**
 * The V8 options every daemon runs with (spawned by the CLI, or started by systemd). The young
 * generation's semi-spaces are capped at 1 MiB (V8 grows them to 8 MiB on a 64-bit machine): the
 * engine allocates little per request, and the daemon's resident memory is what users count.
 * Measured in the VM (6.12) after the same mix of fio jobs: VmRSS 77.2 MiB with the default,
 * 72.7 MiB with the cap.
 */
export const DAEMON_NODE_OPTIONS: readonly string[] = ['--max-semi-space-size=1'];

/**
 * cldd@.service with this installation's node and project paths filled in: quoted for ExecStart
 * (a checkout may be anywhere, "/root/my disks" included), a URL for Documentation.
 */
export async function renderUnit(nodePath = process.execPath, home = CLDD_HOME): Promise<string> {
  const template = await readFile(TEMPLATE, 'utf8');
  return template
    .replaceAll('@NODE@', execArgument(nodePath))
    .replaceAll('@NODE_OPTIONS@', DAEMON_NODE_OPTIONS.map(execArgument).join(' '))
    .replaceAll('@CLDD_JS@', execArgument(join(home, 'bin', 'cldd.js')))
    .replaceAll('@README_URL@', pathToFileURL(join(home, 'README.md')).href.replace(/%/g, '%%')); // % is a specifier there too
}

/** One ExecStart argument, quoted as systemd.service(5) reads it: \\ and \" escaped, % doubled. */
function execArgument(arg: string): string {
  return `"${arg.replace(/\\/g, '\\\\').replace(/"/g, '\\"').replace(/%/g, '%%')}"`;
}
