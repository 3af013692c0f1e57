import { execFile } from 'node:child_process';
import { CldError, codeOf } from './errors.js';

/**
 * Bounds on waits: nothing in the daemon waits forever, and a wait that runs out says what it
 * waited for.
 */

/**
 * Settles as `promise` does, or rejects with `late()` (an error saying what was waited for) once
 * `ms` have passed. `promise` itself runs on; whoever gave up on it handles what it does later.
 */
export async function within<T>(promise: Promise<T>, ms: number, late: () => Error): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const bound = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(late()), ms);
  });
  try {
    return await Promise.race([promise, bound]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * Runs a program to its end and gives its standard output. It fails with ETIMEDOUT, naming
 * `what`, if the program has not ended after `ms` (it is then killed), and otherwise with the last
 * line of its standard error.
 */
export function runWithin(file: string, args: string[], ms: number, what: string, env?: NodeJS.ProcessEnv): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(file, args, { env, timeout: ms, killSignal: 'SIGKILL' }, (err, stdout, stderr) => {
      if (!err) return resolve(stdout);
      if ((err as { killed?: boolean }).killed) return reject(new CldError('ETIMEDOUT', `${what} did not finish within ${ms / 1000} s`));
      const detail = stderr.trim().split('\n').pop() || err.message;
      reject(new CldError(codeOf(err), `${what} failed: ${detail}`));
    });
  });
}
