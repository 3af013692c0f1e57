import { spawn } from 'node:child_process';
import { mkdir, open, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { Readable } from 'node:stream';
import { CldError, isErrorCode } from '../errors.js';
import type { Paths } from '../protocol/paths.js';
import { checkReadyLine, type ReadyMessage } from '../protocol/methods.js';
import { CLDD_HOME, DAEMON_NODE_OPTIONS } from './systemd-unit.js';

/**
 * Starts `cldd daemon NAME` detached, with stderr appended to /run/cldd/NAME.log, and waits
 * for its one-line readiness message on fd 3 (or its death, whose reason is the log's last line).
 */
export async function spawnDaemon(
  paths: Paths,
  name: string,
  args: string[],
  timeoutMs = Number(process.env.CLDD_START_TIMEOUT_MS || 120_000),
): Promise<ReadyMessage> {
  await mkdir(paths.runDir, { recursive: true, mode: 0o700 });
  const logPath = join(paths.runDir, `${name}.log`);
  const log = await open(logPath, 'a', 0o600);
  const child = spawn(process.execPath, [...DAEMON_NODE_OPTIONS, join(CLDD_HOME, 'bin', 'cldd.js'), 'daemon', name, '--ready-fd', '3', ...args], {
    detached: true,
    cwd: '/',
    stdio: ['ignore', 'ignore', log.fd, 'pipe'],
    env: process.env,
  });
  await log.close();
  const pipe = child.stdio[3] as Readable;
  pipe.setEncoding('utf8');
  try {
    return await new Promise<ReadyMessage>((resolve, reject) => {
      let text = '';
      const timer = setTimeout(() => {
        child.kill('SIGTERM');
        reject(new CldError('ETIMEDOUT', `the daemon of "${name}" was not ready within ${timeoutMs / 1000} s (see ${logPath})`));
      }, timeoutMs);
      pipe.on('data', (chunk: string) => {
        text += chunk;
        const nl = text.indexOf('\n');
        if (nl < 0) return;
        clearTimeout(timer);
        let line: ReturnType<typeof checkReadyLine>;
        try {
          line = checkReadyLine(JSON.parse(text.slice(0, nl)), name);
        } catch (err) {
          reject(err instanceof CldError ? err : new CldError('EPROTO', `the daemon of "${name}" reported a start that is not JSON: ${(err as Error).message}`));
          return;
        }
        if ('error' in line) reject(new CldError(isErrorCode(line.error.code) ? line.error.code : 'EIO', line.error.message));
        else resolve(line.ready);
      });
      child.on('exit', async (code, signal) => {
        clearTimeout(timer);
        const last = (await readFile(logPath, 'utf8').catch(() => '')).trim().split('\n').pop() ?? '';
        reject(new CldError('EIO', `the daemon of "${name}" exited (${signal ?? `status ${code}`}) before it was ready: ${last || `see ${logPath}`}`));
      });
    });
  } finally {
    pipe.destroy();
    child.unref();
  }
}
