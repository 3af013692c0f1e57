import { createHash } from 'node:crypto';
import type { MemoryStore } from '../../src/io/memory-store.js';

/** A digest of every byte of a memory store: proves a refusal or a check changed nothing. */
export function digest(store: MemoryStore): string {
  const MiB = 1 << 20;
  const hash = createHash('sha256');
  const buf = new Uint8Array(MiB);
  for (let at = 0; at < store.size; at += MiB) {
    const view = buf.subarray(0, Math.min(MiB, store.size - at));
    store.readSync(view, at);
    hash.update(view);
  }
  return hash.digest('hex');
}
