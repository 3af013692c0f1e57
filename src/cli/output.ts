import { CldError } from '../errors.js';
import { printable } from '../printable.js';

/** Thrown by command handlers to end the process with a code after printing their output. */
export class ExitCode extends Error {
  constructor(readonly code: number) {
    super(`exit ${code}`);
  }
}

/** The exit status of a command line that could not be understood. */
export const USAGE_EXIT = 2;

/** A command line that could not be understood: EINVAL, exit status USAGE_EXIT. */
export class UsageError extends CldError {
  constructor(message: string) {
    super('EINVAL', message);
  }
}

/**
 * One line on stderr, prefixed with the program name and ending with the error's code (a system
 * error's own, EIO for one that has none); a newline in the message is escaped.
 */
export function printError(program: string, err: unknown): void {
  const message = err instanceof Error ? err.message : String(err);
  const own = (err as { code?: unknown } | null)?.code;
  const code = typeof own === 'string' && own ? own : 'EIO';
  process.stderr.write(`${program}: ${printable(message)} [${printable(code)}]\n`);
}

/**
 * JSON.stringify escapes C0 controls in strings but leaves DEL, the C1 controls, the line
 * separators and the bidirectional controls raw (see printable); \u escapes keep the same JSON
 * value and keep them off the terminal. They can only occur inside strings, so replacing them
 * anywhere in the text is safe.
 */
export function printJson(value: unknown): void {
  const json = JSON.stringify(value, null, 2).replace(/[\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`);
  process.stdout.write(`${json}\n`);
}

export function formatBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return i === 0 ? `${n} B` : `${v.toFixed(v >= 100 ? 0 : 1)} ${units[i]}`;
}

/** Renders rows as an aligned text table; every cell is made printable first. */
export function table(rows: string[][]): string {
  const cells = rows.map((r) => r.map((cell) => printable(cell)));
  const widths = cells[0].map((_, c) => Math.max(...cells.map((r) => (r[c] ?? '').length)));
  return cells.map((r) => r.map((cell, c) => (c === r.length - 1 ? cell : cell.padEnd(widths[c]))).join('  ')).join('\n');
}
