import { readdir, readFile, readlink, stat } from 'node:fs/promises';
import { devId } from '../devnum.js';

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
 * fuser does). Our own process is left out: the daemon holds its devices' character ends only.
 */
export async function usersOf(devPath: string): Promise<DeviceUsers> {
  const mounts = await mountsOf(devPath);
  const openers: DeviceUsers['openers'] = [];
  for (const entry of await readdir('/proc')) {
    const pid = Number(entry);
    if (!Number.isInteger(pid) || pid === process.pid) continue;
    let fds: string[];
    try {
      fds = await readdir(`/proc/${pid}/fd`);
    } catch {
      continue; // gone, or not ours to see
    }
    for (const fd of fds) {
      let target: string;
      try {
        target = await readlink(`/proc/${pid}/fd/${fd}`);
      } catch {
        continue;
      }
      if (target === devPath) {
        const command = (await readFile(`/proc/${pid}/comm`, 'utf8').catch(() => '?')).trim();
        openers.push({ pid, command });
        break;
      }
    }
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
