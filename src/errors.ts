/**
 * Every error cldd raises carries a `code`: an errno name where one fits (EINVAL, EIO, EROFS,
 * ENODEV, EBUSY, ENOSPC) and a CLDD_* name for conditions the kernel has no word for.
 */
import { constants } from 'node:os';

/** The errno names Node knows (os.constants.errno). */
export type ErrnoName = keyof typeof constants.errno;

/** cldd's own codes. */
export const CLDD_CODES = ['CLDD_FOREIGN', 'CLDD_CORRUPT', 'CLDD_TOO_SMALL', 'CLDD_STATE', 'CLDD_CLOSED', 'CLDD_VERSION'] as const;
export type ClddCode = (typeof CLDD_CODES)[number];

export type ErrorCode = ErrnoName | ClddCode;

export function isErrorCode(code: unknown): code is ErrorCode {
  return typeof code === 'string' && (Object.prototype.hasOwnProperty.call(constants.errno, code) || (CLDD_CODES as readonly string[]).includes(code));
}

export class CldError extends Error {
  readonly code: ErrorCode;

  constructor(code: ErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'CldError';
    this.code = code;
  }
}

/** The code of anything thrown: its own when it is one of ours or an errno name, else EIO. */
export function codeOf(err: unknown): ErrorCode {
  const code = (err as { code?: unknown } | null)?.code;
  return isErrorCode(code) ? code : 'EIO';
}

/** Anything thrown (a Node or addon error with an errno code, a string) as a CldError. */
export function asCldError(err: unknown): CldError {
  if (err instanceof CldError) return err;
  return new CldError(codeOf(err), err instanceof Error ? err.message : String(err), { cause: err });
}

/** The errno number of an error's code (EIO for codes that are not errno names). */
export function errnoOf(err: unknown): number {
  const code = codeOf(err);
  return (constants.errno as Record<string, number>)[code] ?? constants.errno.EIO;
}

/** Wraps a Node system error so that the message names the operation and the code survives. */
export function ioError(operation: string, err: unknown): CldError {
  if (err instanceof CldError) return err;
  const detail = err instanceof Error ? err.message : String(err);
  return new CldError(codeOf(err), `${operation}: ${detail}`, { cause: err });
}
