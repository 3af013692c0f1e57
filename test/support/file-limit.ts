/**
 * A child process whose files may grow only so far (`prlimit --fsize`): a write past the limit is
 * cut short and the next fails with EFBIG, as a write to a full file system returns short and
 * then fails with ENOSPC. Node ignores SIGXFSZ, so the child lives on; the limit can be lifted
 * while it runs, as space is freed. The scripts are ES modules that import from dist/ (built by
 * the test command's setup).
 */
import { execFile, spawn } from 'node:child_process';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { promisify } from 'node:util';
import { within } from '../../src/deadline.js';

/** The path of a built module, for a child's import. */
export const dist = (...parts: string[]) => JSON.stringify(join(__dirname, '..', '..', 'dist', ...parts));

const args = (bytes: number, script: string, argv: string[]) => [`--fsize=${bytes}:unlimited`, process.execPath, '--input-type=module', '-e', script, ...argv];

/** Runs `script` to its end under the limit; its stdout, trimmed. */
export async function underFileLimit(bytes: number, script: string, ...argv: string[]): Promise<string> {
  const { stdout } = await promisify(execFile)('prlimit', args(bytes, script, argv), { timeout: 10_000 });
  return stdout.trim();
}

/** A child running `script` under the limit, read a line of its stdout at a time. */
export function limitedChild(bytes: number, script: string, argv: string[], stderr: number | 'inherit' = 'inherit') {
  const child = spawn('prlimit', args(bytes, script, argv), { stdio: ['pipe', 'pipe', stderr] });
  const exited = new Promise<number | null>((resolve) => child.on('exit', resolve));
  const lines = createInterface({ input: child.stdout! })[Symbol.asyncIterator]();
  return {
    /** Its next line of stdout (undefined once it has ended), waiting at most 10 s for `what`. */
    line: async (what: string) => (await within(lines.next(), 10_000, () => new Error(`no line from the child after 10 s: waited for ${what}`))).value as string | undefined,
    /** Lifts the limit. */
    lift: () => promisify(execFile)('prlimit', ['--pid', String(child.pid), '--fsize=unlimited:unlimited']),
    send: (text: string) => child.stdin!.write(text),
    exited: () => within(exited, 10_000, () => new Error('the child did not exit within 10 s')),
    kill: () => child.kill(),
  };
}
