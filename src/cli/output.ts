import { CldError } from '../errors.js';

/** Thrown by command handlers to end the process with a code after printing their output. */
export class ExitCode extends Error {
  constructor(readonly code: number) {
    super(`exit ${code}`);
  }
}

/** One line on stderr, prefixed with the program name. */
export function printError(program: string, err: unknown): void {
  const message = err instanceof Error ? err.message : String(err);
  const code = err instanceof CldError ? ` [${err.code}]` : '';
  process.stderr.write(`${program}: ${message.split('\n')[0]}${code}\n`);
}

export function printJson(value: unknown): void {
  process.stdout.write(`${JSON.stringify(value, null, 2)}\n`);
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

/** Parses sizes such as 512M, 10G, 1.5T, 4096 (bytes), with binary units. */
export function parseSize(text: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b)?\s*$/i.exec(text);
  if (!m) throw new CldError('EINVAL', `"${text}" is not a size (examples: 4096, 512M, 20G, 1T)`);
  const power = ' kmgtp'.indexOf((m[2] || ' ').toLowerCase());
  const bytes = Math.floor(Number(m[1]) * 1024 ** power);
  if (!Number.isSafeInteger(bytes) || bytes <= 0) throw new CldError('EINVAL', `size "${text}" is out of range`);
  return bytes;
}

/** Renders rows as an aligned text table. */
export function table(rows: string[][]): string {
  const widths = rows[0].map((_, c) => Math.max(...rows.map((r) => (r[c] ?? '').length)));
  return rows.map((r) => r.map((cell, c) => (c === r.length - 1 ? cell : cell.padEnd(widths[c]))).join('  ')).join('\n');
}
