import { readdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { ioError } from '../errors.js';
import { statePath, type Paths } from './paths.js';

/**
 * /run/cldd/NAME.json: what a running (or crashed) daemon holds. It outlives a SIGKILL on
 * purpose: the restarted daemon reads the device ids from it to reattach them.
 */
export interface DaemonState {
  name: string;
  pid: number;
  backing: string;
  /** dev and ino of the backing file, to refuse attaching it twice. */
  backingId: string;
  master: { id: number; path: string } | null;
  slave: { id: number; path: string } | null;
  /** N of the short names /dev/cldmN and /dev/cldsN. */
  index: number | null;
  startedAt: number;
}

export async function readState(paths: Paths, name: string): Promise<DaemonState | null> {
  try {
    return JSON.parse(await readFile(statePath(paths, name), 'utf8')) as DaemonState;
  } catch {
    return null;
  }
}

/** Replaces the state file whole (tmpfs: no sync); a failure names it and leaves the old one. */
export async function writeState(paths: Paths, state: DaemonState): Promise<void> {
  const path = statePath(paths, state.name);
  try {
    await writeFile(`${path}.tmp`, JSON.stringify(state, null, 2), { mode: 0o600 });
    await rename(`${path}.tmp`, path);
  } catch (err) {
    await rm(`${path}.tmp`, { force: true }).catch(() => {});
    throw ioError(`write the state file ${path}`, err);
  }
}

export async function removeState(paths: Paths, name: string): Promise<void> {
  await rm(statePath(paths, name), { force: true });
}

export function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as { code?: string }).code === 'EPERM';
  }
}

/** Every state file under the run directory, live daemons' and crashed ones'. */
export async function listStates(paths: Paths): Promise<DaemonState[]> {
  const names = (await readdir(paths.runDir).catch(() => [] as string[])).filter((e) => e.endsWith('.json'));
  const states = await Promise.all(names.map((e) => readState(paths, e.slice(0, -5))));
  return states.filter((s): s is DaemonState => s !== null);
}
