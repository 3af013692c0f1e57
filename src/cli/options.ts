/**
 * Command-line values, parsed and range-checked before a command looks at or writes anything:
 * a refused option never leaves a file created, formatted or half-attached behind. A refusal is
 * a usage error (EINVAL, exit status 2).
 */
import { MIN_BLOCK_SIZE } from '../format/format.js';
import { MAX_DEVICE_BLOCK_SIZE } from '../ublk/control.js';
import { checkName } from '../protocol/paths.js';
import { UsageError } from './output.js';

export { MAX_DEVICE_BLOCK_SIZE };
export const DEFAULT_BLOCK_SIZE = 4096;

/** yargs makes an array of an option given twice: refuse that rather than pick one. */
function single(option: string, value: unknown): string {
  if (Array.isArray(value)) throw new UsageError(`${option} is given ${value.length} times; give it once`);
  return String(value);
}

/**
 * Sizes such as 512M, 10G, 1.5T, 20GiB, 4096 or 4096B (bytes), with binary units. "iB" needs a
 * unit letter before it (5iB is not 5 bytes), and bytes are whole.
 */
export function parseSize(option: string, value: unknown): number {
  const text = single(option, value);
  const m = /^\s*(\d+(?:\.\d+)?)\s*(?:([kmgtp])(?:i?b)?|b)?\s*$/i.exec(text);
  if (!m || (!m[2] && m[1].includes('.'))) throw new UsageError(`${option} "${text}" is not a size (examples: 4096, 512M, 20G, 1T)`);
  const power = ' kmgtp'.indexOf((m[2] || ' ').toLowerCase());
  const bytes = Math.floor(Number(m[1]) * 1024 ** power);
  if (!Number.isSafeInteger(bytes) || bytes <= 0) throw new UsageError(`${option} "${text}" is out of range`);
  return bytes;
}

/** A whole number in decimal from min to max: no signs, fractions, exponents or hex. */
export function parseCount(option: string, value: unknown, range: { min: number; max: number }): number {
  const text = single(option, value);
  const n = /^\d{1,16}$/.test(text) ? Number(text) : NaN;
  if (!(n >= range.min && n <= range.max)) {
    throw new UsageError(`${option} "${text}" is not a whole number from ${range.min} to ${range.max}`);
  }
  return n;
}

/** Why no store with larger blocks can be attached, for messages. */
export const DEVICE_BLOCK_LIMIT = `a block device's blocks are at most the page size (${MAX_DEVICE_BLOCK_SIZE} bytes on x86-64)`;

/** A block size for a new store: a power of two the format takes and a ublk device serves. */
export function parseBlockSize(option: string, value: unknown): number {
  const text = single(option, value);
  const n = /^\d{1,16}$/.test(text) ? Number(text) : NaN;
  if (Number.isInteger(Math.log2(n)) && n >= MIN_BLOCK_SIZE && n <= MAX_DEVICE_BLOCK_SIZE) return n;
  const allowed =
    MIN_BLOCK_SIZE === MAX_DEVICE_BLOCK_SIZE ? `${MIN_BLOCK_SIZE}` : `a power of two from ${MIN_BLOCK_SIZE} to ${MAX_DEVICE_BLOCK_SIZE}`;
  throw new UsageError(
    `${option} "${text}" is not allowed: cldd's blocks are at least ${MIN_BLOCK_SIZE} bytes and ${DEVICE_BLOCK_LIMIT}, so it must be ${allowed}`,
  );
}

/** A path operand: present and not empty (an empty one would resolve to the working directory). */
export function parsePath(what: string, value: unknown): string {
  const text = single(what, value);
  if (!text) throw new UsageError(`${what} is empty`);
  return text;
}

/** A pair name given on the command line (--name). */
export function parseName(option: string, value: unknown): string {
  const text = single(option, value);
  try {
    return checkName(text);
  } catch (err) {
    throw new UsageError(`${option}: ${(err as Error).message}`);
  }
}
