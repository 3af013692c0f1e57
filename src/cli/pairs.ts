import { readdir, realpath } from 'node:fs/promises';
import { basename } from 'node:path';
import { CldError, ioError } from '../errors.js';
import { DaemonClient } from '../protocol/client.js';
import { checkName, defaultPaths, socketPath, type Paths } from '../protocol/paths.js';
import { isAlive, listStates, readState } from '../protocol/state-file.js';

/**
 * Names of the pairs that have a control socket under the run directory. No run directory means
 * no pairs; one that cannot be read (it is root's, mode 0700) is an error, not an empty list.
 */
export async function pairNames(paths: Paths = defaultPaths()): Promise<string[]> {
  let entries: string[];
  try {
    entries = await readdir(paths.runDir);
  } catch (err) {
    const code = (err as { code?: string }).code;
    if (code === 'ENOENT') return [];
    if (code === 'EACCES' || code === 'EPERM') throw new CldError('EACCES', `permission denied on ${paths.runDir} (are you root?)`, { cause: err });
    throw ioError(`read ${paths.runDir}`, err);
  }
  return entries.filter((e) => e.endsWith('.sock')).map((e) => e.slice(0, -5)).sort();
}

/**
 * Resolves what the user typed: a pair name, a stable path (/dev/cldd/NAME/master, /dev/cldmN,
 * /dev/cldsN) or a /dev/ublkbN device, to the pair's name.
 */
export async function resolvePair(what: string, paths: Paths = defaultPaths()): Promise<string> {
  if (!what.startsWith('/')) return checkName(what);
  const stable = /^\/dev\/cldd\/([^/]+)\/(master|slave)$/.exec(what);
  if (stable) return checkName(stable[1]);
  // /dev/cldsN exists only while the slave is enabled, so short names go by the pair's index.
  const short = /^\/dev\/cld[ms](\d+)$/.exec(what);
  if (short) {
    const found = (await listStates(paths)).find((s) => s.index === Number(short[1]));
    if (found) return found.name;
    throw new CldError('ENODEV', `${what} is not a device of any running cldd pair`);
  }
  let device: string;
  try {
    device = await realpath(what);
  } catch {
    throw new CldError('ENOENT', `${what} does not exist`);
  }
  for (const name of await pairNames(paths)) {
    for (const role of ['master', 'slave']) {
      try {
        if ((await realpath(`/dev/cldd/${name}/${role}`)) === device) return name;
      } catch {
        // no such link
      }
    }
  }
  throw new CldError('ENODEV', `${what} (${basename(device)}) is not a device of any running cldd pair`);
}

export async function connectPair(name: string, paths: Paths = defaultPaths()): Promise<DaemonClient> {
  try {
    return await DaemonClient.connect(socketPath(paths, name), name);
  } catch (err) {
    // A daemon that died (SIGKILL, crash) leaves its state file and its devices, whose I/O
    // waits for a server: say how to get it back rather than "not running".
    const state = (err as CldError).code === 'ENOENT' ? await readState(paths, name) : null;
    if (state && !isAlive(state.pid)) {
      throw new CldError(
        'ESRCH',
        `the daemon of "${name}" (pid ${state.pid}) died and its devices wait for it: run "cldd add ${state.backing}" to reattach them, then retry`,
      );
    }
    throw err;
  }
}

/** Runs `fn` with a connection to the pair's daemon, closing it afterwards. */
export async function withPair<T>(what: string, fn: (client: DaemonClient, name: string) => Promise<T>): Promise<T> {
  const name = await resolvePair(what);
  const client = await connectPair(name);
  try {
    return await fn(client, name);
  } finally {
    client.close();
  }
}
