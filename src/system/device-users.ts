import { readFile, stat } from 'node:fs/promises';
import { devId } from '../devnum.js';
import { asCldError } from '../errors.js';
import { addon } from '../native/addon.js';

export interface DeviceUsers {
  /** Mount points of the device. */
  mounts: string[];
  /** Processes holding it open (pid and command name). */
  openers: { pid: number; command: string }[];
}


/** Mount points whose filesystem sits on the block device `devPath` (from /proc/self/mountinfo). */
export async function mountsOf(devPath: string): Promise<string[]> {
  const id = devId((await stat(devPath)).rdev);
  const text = await readFile('/proc/self/mountinfo', 'utf8');
  return text
    .split('\n')
    .map((line) => line.split(' '))
    .filter((f) => f[2] === id)
    .map((f) => f[4].replace(/\\(\d{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8))));
}

/**
 * Who uses a block device: mounts, and processes with it open (a scan of /proc/PID/fd, as
 * fuser does, in the addon: one pass on a pool thread). Our own process is left out: the daemon
 * holds its devices' character ends only.
 */
export async function usersOf(devPath: string): Promise<DeviceUsers> {
  const mounts = await mountsOf(devPath);
  let openers: DeviceUsers['openers'];
  try {
    openers = await addon().openersOf(devPath);
  } catch (err) {
    throw asCldError(err);
  }
  return { mounts, openers };
}

/** The block device a path's filesystem lives on, as major:minor. */
export async function deviceOfPath(path: string): Promise<string> {
  return devId((await stat(path)).dev);
}

export async function deviceNumber(devPath: string): Promise<string> {
  return devId((await stat(devPath)).rdev);
}
