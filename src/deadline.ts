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
