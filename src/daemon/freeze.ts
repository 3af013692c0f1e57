import { execFile } from 'node:child_process';
import { CldError } from '../errors.js';

/** Freezes and thaws a mounted filesystem (FIFREEZE / FITHAW). */
export interface Freezer {
  freeze(mountpoint: string): Promise<void>;
  thaw(mountpoint: string): Promise<void>;
}

/**
 * Uses util-linux's fsfreeze, which issues exactly FIFREEZE and FITHAW. It runs as a separate
 * process on purpose: FIFREEZE writes back dirty data to the master before it returns, and
 * the daemon must keep serving that I/O while it waits.
 */
export const fsfreeze: Freezer = {
  freeze: (mountpoint) => runFsfreeze('-f', mountpoint),
  thaw: (mountpoint) => runFsfreeze('-u', mountpoint),
};

function runFsfreeze(flag: '-f' | '-u', mountpoint: string): Promise<void> {
  return new Promise((resolve, reject) => {
    execFile('fsfreeze', [flag, mountpoint], { cwd: '/' }, (err, _stdout, stderr) => {
      if (!err) return resolve();
      const what = flag === '-f' ? 'freeze' : 'thaw';
      reject(new CldError('EIO', `could not ${what} ${mountpoint}: ${stderr.trim() || err.message}`));
    });
  });
}
