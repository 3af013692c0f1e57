/**
 * Every error cldd raises carries a `code`: an errno name where one fits (EINVAL, EIO, EROFS,
 * ENODEV, EBUSY, ENOSPC) and a CLDD_* name for conditions the kernel has no word for.
 */
export type ErrorCode =
  | 'EINVAL'
  | 'EIO'
  | 'EROFS'
  | 'ENODEV'
  | 'EBUSY'
  | 'ENOENT'
  | 'EPERM'
  | 'EACCES'
  | 'ENOSPC'
  | 'EPROTO'
  | 'CLDD_FOREIGN'
  | 'CLDD_CORRUPT'
  | 'CLDD_TOO_SMALL'
  | 'CLDD_STATE'
  | 'CLDD_CLOSED'
  | 'CLDD_VERSION';

export class CldError extends Error {
  readonly code: ErrorCode | string;

  constructor(code: ErrorCode | string, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'CldError';
    this.code = code;
  }
}

/** Wraps a Node system error so that the message names the operation and the code survives. */
export function ioError(operation: string, err: unknown): CldError {
  if (err instanceof CldError) return err;
  const code = (err as { code?: string } | null)?.code ?? 'EIO';
  const detail = err instanceof Error ? err.message : String(err);
  return new CldError(code, `${operation}: ${detail}`, { cause: err });
}
