/**
 * Keeps merges and master writes of the resync state off each other's blocks: a merge copies a
 * change-area run into the data area, so a master write to those blocks landing in between
 * would be overwritten by stale data. Writes exclude merges and merges exclude writes; writes
 * do not exclude each other (ordering overlapping writes is the kernel's business). Merges
 * exclude each other too: a merge decides its runs once it holds its range, and a second merge
 * of the same blocks holding it at the same time would copy them again after the first had
 * cleared their bits, when a write may already have gone to the data area without any lock
 * (none of its blocks redirected), and put the stale copy over it.
 */
type Kind = 'write' | 'merge';

interface Held {
  kind: Kind;
  start: number;
  end: number;
}

interface Waiter extends Held {
  wake: (held: Held) => void;
}

export class RangeLocks {
  private readonly held = new Set<Held>();
  private waiters: Waiter[] = [];

  /** Takes the range now if nothing held or queued conflicts; null otherwise. */
  tryAcquire(kind: Kind, start: number, end: number): Held | null {
    // Queued requests of the other kind go first, so a steady stream of writes cannot starve a merge.
    if (this.conflicts(kind, start, end) || overlapsOther(this.waiters, kind, start, end)) return null;
    const h = { kind, start, end };
    this.held.add(h);
    return h;
  }

  acquire(kind: Kind, start: number, end: number): Promise<Held> {
    const h = this.tryAcquire(kind, start, end);
    if (h) return Promise.resolve(h);
    return new Promise((wake) => this.waiters.push({ kind, start, end, wake }));
  }

  release(h: Held): void {
    this.held.delete(h);
    const still: Waiter[] = [];
    for (const w of this.waiters) {
      if (this.conflicts(w.kind, w.start, w.end) || overlapsOther(still, w.kind, w.start, w.end)) {
        still.push(w);
      } else {
        const granted = { kind: w.kind, start: w.start, end: w.end };
        this.held.add(granted);
        w.wake(granted);
      }
    }
    this.waiters = still;
  }

  get size(): number {
    return this.held.size;
  }

  private conflicts(kind: Kind, start: number, end: number): boolean {
    for (const h of this.held) if (excludes(h.kind, kind) && h.start < end && start < h.end) return true;
    return false;
  }
}

function excludes(a: Kind, b: Kind): boolean {
  return a !== b || a === 'merge';
}

function overlapsOther(list: readonly Held[], kind: Kind, start: number, end: number): boolean {
  for (const h of list) if (excludes(h.kind, kind) && h.start < end && start < h.end) return true;
  return false;
}

export type RangeLock = Held;
