import { CldError } from '../errors.js';

export function requireRoot(what: string): void {
  if (typeof process.getuid === 'function' && process.getuid() !== 0) {
    throw new CldError('EPERM', `${what} needs root`);
  }
}
