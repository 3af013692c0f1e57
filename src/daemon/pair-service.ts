import { within } from '../deadline.js';
import { asCldError, CldError } from '../errors.js';
import type { ResyncScheduler } from '../engine/resync.js';
import type { Volume } from '../engine/volume.js';
import { deviceNumber, deviceOfPath, mountsOf, usersOf } from '../system/device-users.js';
import type { Freezer } from '../system/freeze.js';
import type { Logger } from './logger.js';
import { CHANGES_PAGE, type DeviceLayout, type PairStatus, type Result } from '../protocol/methods.js';
import type { OutstandingRequest } from '../ublk/device.js';

export interface DeviceInfo {
  /** ublk device id (N of /dev/ublkbN). */
  id: number;
  path: string;
}

/** How the kernel serves a device: fixed when it is created. */

/**
 * The kernel devices that serve a volume. The master lives as long as the daemon; the slave is
 * a fresh device for each snapshot (no page cache of an older snapshot can be served from it),
 * added after enable and removed once disable has moved the volume out of snapshot.
 */
export interface PairDevices {
  readonly master: DeviceInfo;
  readonly slave: DeviceInfo | null;
  /** Whether these are a dead daemon's devices, taken over (user recovery). */
  readonly recovered: boolean;
  /** What the kernel serves the master with (a recovered device keeps its original layout). */
  readonly layout: DeviceLayout;
  addSlave(): Promise<DeviceInfo>;
  /** Stops and deletes the slave; EBUSY while it is in use. */
  removeSlave(): Promise<void>;
  /** Stops and deletes every device (I/O in flight completes first). */
  stop(): Promise<void>;
  /** Requests each device has not completed yet, oldest first (for a stall's diagnosis). */
  outstanding(): { device: string; requests: OutstandingRequest[] }[];
}

/** Keeps the stable names in step with the devices. */
export interface LinkKeeper {
  slaveAdded(slave: DeviceInfo): Promise<void>;
  slaveRemoved(): Promise<void>;
}

export interface EnableParams {
  /** Freeze this mountpoint; '' or absent: freeze wherever the master is mounted. */
  freeze?: string;
  /** Do not freeze even when the master is mounted. */
  noFreeze?: boolean;
  /** From resync, wait for the merge to finish instead of refusing. */
  wait?: boolean;
}

export interface EnableResult {
  epoch: number;
  frozen: string | null;
  /** How long the filesystem was frozen, in milliseconds. */
  frozenMs: number | null;
}

/** How long a filesystem may stay frozen before the watchdog thaws it. */
export const FREEZE_LIMIT_MS = 10_000;

/**
 * How long an enable waits for a resync that runs when it arrives. `cldd enable --wait`
 * follows the resync before it asks (src/cli/progress.ts), so this wait only covers a resync
 * started in between. It must end well within the CLI's reply bound for enable
 * (REPLY_BOUND_MS): a daemon still waiting after the user was told the enable failed would
 * take the snapshot afterwards.
 */
export const RESYNC_WAIT_MS = 120_000;

/**
 * FIFREEZE, bounded: freezing writes back the filesystem's dirty data through the master this
 * process serves, so a master request that never completes would hold it forever. Past
 * `limitMs` the enable gives up; a freeze that completes later is thawed at once.
 */
export async function freezeWithin(freezer: Freezer, mountpoint: string, limitMs: number, log: Logger): Promise<void> {
  let gaveUp = false;
  const frozen = freezer.freeze(mountpoint).then(
    () => {
      if (!gaveUp) return;
      freezer.thaw(mountpoint).then(
        () => log.warn(`FIFREEZE of ${mountpoint} completed after the enable gave up on it; thawed`),
        (err: unknown) => log.error(`thaw ${mountpoint} after a late FIFREEZE: ${(err as Error).message}`),
      );
    },
    (err: unknown) => {
      if (!gaveUp) throw err;
    },
  );
  await within(frozen, limitMs, () => {
    gaveUp = true;
    return new CldError('ETIMEDOUT', `FIFREEZE of ${mountpoint} did not complete within ${limitMs / 1000} s (it writes back through the master; cldd status shows the master's requests); nothing was enabled`);
  });
}

/**
 * What a pair's daemon does on request: status, enable (with the filesystem frozen for the
 * switch), disable, resync progress. It owns no sockets or devices itself, so it runs the
 * same with kernel devices and in tests without them.
 */
export class PairService {
  constructor(
    readonly name: string,
    readonly backing: string,
    private readonly volume: Volume,
    private readonly scheduler: ResyncScheduler,
    private readonly devices: PairDevices | null,
    private readonly freezer: Freezer,
    private readonly log: Logger,
    private readonly links: LinkKeeper | null = null,
    private readonly freezeLimitMs = FREEZE_LIMIT_MS,
    private readonly resyncWaitMs = RESYNC_WAIT_MS,
  ) {}

  status(): PairStatus {
    const s = this.volume.status();
    const p = this.scheduler.progress();
    return {
      name: this.name,
      backing: this.backing,
      pid: process.pid,
      state: s.state,
      master: this.devices?.master.path ?? null,
      slave: this.devices?.slave?.path ?? null,
      capacity: s.capacity,
      blockSize: s.blockSize,
      redirected: s.redirected,
      snapshot: s.epoch,
      stateChangedAt: s.stateChangedAt,
      resync: s.state === 'resync' || p.running ? p : null,
      counters: s.counters,
      failed: s.failed,
      requests: this.requestSummary(),
      uuid: s.uuid,
      tracking: s.tracking,
      journal: s.journal,
    };
  }

  /**
   * The extents that differ between snapshot `since` (default: the previous one) and the
   * enabled snapshot, a page at a time from byte offset `after`. Where the store does not know
   * (no tracking, or an older snapshot than the last delta), everything counts as changed.
   */
  changes(params: { since?: number; after?: number }): Result<'changes'> {
    const v = this.volume;
    if (v.state !== 'snapshot') {
      throw new CldError('CLDD_STATE', `no snapshot is enabled (the state is ${v.state}): changes are between snapshots; cldd status shows what changed since snapshot ${v.epoch}`);
    }
    const snapshot = v.epoch;
    const since = params.since ?? snapshot - 1;
    if (since > snapshot) throw new CldError('EINVAL', `snapshot ${since} is after the enabled snapshot ${snapshot}`);
    const capacity = v.capacity;
    const t = v.tracking;
    const known = t?.changesSince(since) ?? null;
    const reason = !t
      ? 'this store (format version 2) has no changed-block tracking'
      : known === null
        ? `only the changes since snapshot ${snapshot - 1} are kept`
        : null;
    const all = known ?? [[0, capacity] as [number, number]];
    const after = params.after ?? 0;
    let first = 0;
    while (first < all.length && all[first][0] < after) first++;
    const extents = all.slice(first, first + CHANGES_PAGE);
    const next = first + CHANGES_PAGE < all.length ? all[first + CHANGES_PAGE][0] : null;
    return {
      uuid: Buffer.from(v.superblock.uuid).toString('hex'),
      snapshot,
      since,
      available: known !== null,
      reason,
      chunkSize: t ? 2 ** t.chunkShift : v.blockSize,
      capacity,
      changedBytes: all.reduce((n, [, length]) => n + length, 0),
      extentCount: all.length,
      extents,
      next,
    };
  }

  /** How many requests the devices hold and how old the oldest is (a stall shows here first). */
  private requestSummary(): { outstanding: number; oldestMs: number | null } {
    const all = this.requests().flatMap((d) => d.requests);
    return { outstanding: all.length, oldestMs: all.length ? Math.max(...all.map((r) => r.ageMs)) : null };
  }

  /** Requests the devices have not completed, oldest first: what a stall waits for. */
  requests(): { device: string; requests: OutstandingRequest[] }[] {
    return this.devices?.outstanding() ?? [];
  }

  async enable(params: EnableParams = {}): Promise<EnableResult> {
    // The volume's refusals, before anything is frozen.
    const refused = this.volume.enableRefusal({ wait: params.wait });
    if (refused) throw refused;
    if (this.volume.state === 'resync') {
      this.log.info('enable: waiting for the resync to finish');
      await this.untilResyncDone();
      const after = this.volume.enableRefusal();
      if (after) throw after;
    }
    // A slave whose device a disable could not remove: gone before anything is frozen or enabled.
    const old = this.devices?.slave;
    if (old && this.volume.state !== 'snapshot') await this.removeOldSlave(old, 'enable');
    const mountpoint = await this.freezeTarget(params);
    if (!mountpoint) {
      await this.volume.enable();
      await this.attachSlave();
      this.log.info(`enabled snapshot ${this.volume.epoch} (no filesystem to freeze)`);
      return { epoch: this.volume.epoch, frozen: null, frozenMs: null };
    }
    await freezeWithin(this.freezer, mountpoint, this.freezeLimitMs, this.log);
    const frozenAt = performance.now();
    let thawed = false;
    const thaw = async (why: string) => {
      if (thawed) return;
      thawed = true;
      await this.freezer.thaw(mountpoint);
      this.log.info(`thawed ${mountpoint} ${why}`);
    };
    const watchdog = setTimeout(() => {
      this.log.error(`enable did not finish within ${this.freezeLimitMs} ms; thawing ${mountpoint}`);
      thaw('by the watchdog').catch((err) => this.log.error(String(err)));
    }, this.freezeLimitMs);
    let frozenMs = 0;
    try {
      await this.volume.enable();
    } finally {
      clearTimeout(watchdog);
      await thaw('after the switch');
      frozenMs = performance.now() - frozenAt;
    }
    // The slave device comes after the thaw: creating it takes longer than the switch.
    await this.attachSlave();
    this.log.info(`enabled snapshot ${this.volume.epoch}; ${mountpoint} was frozen for ${frozenMs.toFixed(1)} ms`);
    return { epoch: this.volume.epoch, frozen: mountpoint, frozenMs };
  }

  /**
   * Waits until the resync has merged everything back, or fails when it stops without having
   * done so (a merge that failed, a daemon stopping): a scheduler that no longer runs would
   * never finish it. It also fails after resyncWaitMs, saying how much was left.
   */
  private async untilResyncDone(): Promise<void> {
    const deadline = performance.now() + this.resyncWaitMs;
    for (;;) {
      if (this.volume.state !== 'resync') return;
      const p = this.scheduler.progress();
      if (!p.running) {
        throw new CldError('CLDD_STATE', `the resync stopped with ${p.blocksLeft} blocks left${p.error ? ` (${p.error})` : ''}; the slave cannot be enabled before it has finished`);
      }
      // The scheduler's loop ends when the volume is plain, when it is stopped, or on an error.
      const late = () => {
        const left = this.scheduler.progress().blocksLeft;
        return new CldError('ETIMEDOUT', `the resync still had ${left} blocks left after ${this.resyncWaitMs / 1000} s; the slave was not enabled (cldd enable --wait follows the resync before it asks)`);
      };
      await within(Promise.race([this.volume.untilPlain(), this.scheduler.start().catch(() => {})]), Math.max(0, deadline - performance.now()), late);
    }
  }

  /** Adds the slave device of a volume in snapshot (after enable, or when a daemon starts). */
  async attachSlave(): Promise<void> {
    if (!this.devices || this.devices.slave || this.volume.state !== 'snapshot') return;
    const slave = await this.devices.addSlave();
    await this.links?.slaveAdded(slave);
  }

  async disable(): Promise<{ state: string; blocks: number }> {
    if (this.volume.state !== 'snapshot') throw new CldError('CLDD_STATE', `the slave is not enabled (the state is ${this.volume.state})`);
    const slave = this.devices?.slave;
    if (slave) {
      const users = await usersOf(slave.path);
      if (users.mounts.length) throw new CldError('EBUSY', `the slave is mounted on ${users.mounts.join(', ')}: unmount it first`);
      if (users.openers.length) {
        const who = users.openers.map((o) => `${o.command} (pid ${o.pid})`).join(', ');
        throw new CldError('EBUSY', `the slave is open by ${who}: close it first`);
      }
    }
    await this.volume.disable();
    const blocks = this.volume.map.count;
    this.log.info(`disabled the slave; ${blocks} blocks to merge back`);
    void this.scheduler.start();
    if (slave) await this.removeOldSlave(slave, 'disable');
    return { state: this.volume.state, blocks };
  }

  /**
   * Removes the device of a slave the volume no longer serves. From the move out of snapshot on,
   * the engine refuses every request of the slave's (docs/serving.md), so its device goes while
   * the resync already copies: removing it first (STOP_DEV, DEL_DEV, the queues' close) held the
   * copy up by 60-100 ms (7.3 TCG VM, docs/benchmarks.md). A removal that fails leaves the device,
   * serving nothing; the next enable removes it before it adds a fresh one (a slave is never
   * reused: its page cache holds the older snapshot).
   */
  private async removeOldSlave(slave: DeviceInfo, during: 'disable' | 'enable'): Promise<void> {
    try {
      await this.devices!.removeSlave();
    } catch (err) {
      const e = asCldError(err);
      const then = during === 'disable' ? `the slave is disabled (${this.volume.state}), but its device` : 'the device of the last snapshot\'s slave';
      throw new CldError(e.code, `${then} ${slave.path} could not be removed: ${e.message}; it serves no I/O, and the next enable removes it first`, { cause: err });
    }
    await this.links?.slaveRemoved();
  }

  /**
   * Whether the pair may stop: not while a device is mounted or open, nor during a resync,
   * unless forced (a forced stop finishes the resync first).
   */
  async checkStoppable(force: boolean): Promise<void> {
    if (this.devices) {
      const devices = [['master', this.devices.master], ['slave', this.devices.slave]] as const;
      for (const [role, dev] of devices) {
        if (!dev) continue;
        const users = await usersOf(dev.path);
        const busy = [
          ...users.mounts.map((m) => `mounted on ${m}`),
          ...users.openers.map((o) => `open by ${o.command} (pid ${o.pid})`),
        ];
        if (busy.length === 0) continue;
        if (!force) throw new CldError('EBUSY', `the ${role} ${dev.path} is ${busy.join(', ')}: unmount or close it first`);
        this.log.warn(`stopping although the ${role} is ${busy.join(', ')} (forced): its users will get I/O errors`);
      }
    }
    if (this.volume.state === 'resync' && !force) {
      throw new CldError('CLDD_STATE', `a resync is running (${this.volume.map.count} blocks left): wait for it, or force to finish it first`);
    }
  }

  /** The resync's progress; with `waitMs`, once the resync has ended or after that long. */
  async progress(waitMs = 0): Promise<Result<'progress'>> {
    if (waitMs > 0) {
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([this.scheduler.ended(), new Promise<void>((resolve) => (timer = setTimeout(resolve, waitMs)))]);
      clearTimeout(timer);
    }
    return { state: this.volume.state, ...this.scheduler.progress() };
  }

  setResyncRate(bytesPerSecond: number): void {
    this.scheduler.setRateLimit(bytesPerSecond);
  }

  /** Where to freeze: the asked mountpoint (which must be this master's) or the master's mount. */
  private async freezeTarget(params: EnableParams): Promise<string | null> {
    if (params.noFreeze || !this.devices) {
      if (params.freeze) throw new CldError('EINVAL', 'nothing to freeze: this pair has no devices');
      return null;
    }
    const master = this.devices.master.path;
    if (params.freeze) {
      const [mine, theirs] = await Promise.all([deviceNumber(master), deviceOfPath(params.freeze)]);
      if (mine !== theirs) throw new CldError('EINVAL', `${params.freeze} is not on ${master}: refusing to freeze another filesystem`);
      return params.freeze;
    }
    const mounts = await mountsOf(master);
    if (mounts.length > 1) this.log.info(`the master is mounted ${mounts.length} times; freezing ${mounts[0]} freezes them all`);
    return mounts[0] ?? null;
  }
}
