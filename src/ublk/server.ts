/**
 * Serves one Volume as a pair of ublk devices:
 *
 *   master  read/write, volatile write cache + FUA, discard and write-zeroes;
 *   slave   read-only, the enable-time image; it exists only while the volume is in 'snapshot'.
 *
 * The slave is added by enable() and stopped and deleted by disable(), rather than existing
 * always and failing I/O: each snapshot then gets a fresh block device, so no page cache from an
 * earlier snapshot can be served, and nothing probes a device that only returns errors.
 * disable() refuses (EBUSY) while the slave is open exclusively (mounted, for instance).
 *
 * Devices are created with user recovery (the reissue variant when the kernel offers it): if
 * this process dies, the block devices stay, their I/O waits, and recover() in a new process
 * takes them over.
 */
import { constants as fsConstants, promises as fs } from 'node:fs';
import { CldError } from '../errors.js';
import { ResyncScheduler } from '../engine/resync.js';
import type { Volume } from '../engine/volume.js';
import type { NativeStore } from '../store/native-store.js';
import { UblkControl, flagNames } from './control.js';
import { DEFAULT_QUEUE_OPTIONS, UblkDevice, type QueueOptions } from './device.js';

export interface ServerOptions extends Partial<QueueOptions> {
  /** Device ids to ask for (the kernel picks when absent). */
  masterId?: number;
  slaveId?: number;
}

export interface ServerStatus {
  master: string;
  masterId: number;
  slave: string | null;
  slaveId: number | null;
  state: Volume['state'];
  flags: string[];
}

export class DeviceServer {
  private slave: UblkDevice | null = null;
  private resync: ResyncScheduler | null = null;
  private stopping: Promise<void> | null = null;
  private transition: Promise<unknown> = Promise.resolve();

  private constructor(
    private readonly control: UblkControl,
    readonly volume: Volume,
    readonly store: NativeStore,
    private readonly master: UblkDevice,
    private readonly queueOptions: QueueOptions,
    private readonly flags: number,
  ) {}

  /** Adds and starts the devices for `volume` (the slave too when it is in 'snapshot'). */
  static async start(volume: Volume, store: NativeStore, options: ServerOptions = {}): Promise<DeviceServer> {
    const queueOptions = { ...DEFAULT_QUEUE_OPTIONS, ...definedOnly(options) };
    const control = UblkControl.open();
    try {
      const flags = await control.negotiateRecoveryFlags();
      const master = await UblkDevice.create(control, volume, store.fd, 'master', { ...queueOptions, id: options.masterId, flags });
      const server = new DeviceServer(control, volume, store, master, queueOptions, flags);
      try {
        if (volume.state === 'snapshot') server.slave = await server.addSlave(options.slaveId);
        server.startResync();
      } catch (err) {
        await server.stop().catch(() => {});
        throw err;
      }
      return server;
    } catch (err) {
      control.close();
      throw err;
    }
  }

  /** Takes over devices whose previous server died (see UblkDevice.recover). */
  static async recover(volume: Volume, store: NativeStore, ids: { masterId: number; slaveId?: number }, options: Partial<QueueOptions> = {}): Promise<DeviceServer> {
    const queueOptions = { ...DEFAULT_QUEUE_OPTIONS, ...definedOnly(options) };
    const control = UblkControl.open();
    try {
      const master = await UblkDevice.recover(control, volume, store.fd, 'master', ids.masterId);
      const server = new DeviceServer(control, volume, store, master, queueOptions, master.info.flags);
      if (ids.slaveId !== undefined) {
        if (volume.state === 'snapshot') {
          server.slave = await UblkDevice.recover(control, volume, store.fd, 'slave', ids.slaveId);
        } else {
          // The old server died while disabling: the slave's device has no image to show any
          // more, so it is taken over only to be removed.
          const stale = await UblkDevice.recover(control, volume, store.fd, 'slave', ids.slaveId);
          await stale.stop();
        }
      } else if (volume.state === 'snapshot') {
        server.slave = await server.addSlave();
      }
      server.startResync();
      return server;
    } catch (err) {
      control.close();
      throw err;
    }
  }

  status(): ServerStatus {
    return {
      master: this.master.path,
      masterId: this.master.id,
      slave: this.slave?.path ?? null,
      slaveId: this.slave?.id ?? null,
      state: this.volume.state,
      flags: flagNames(this.flags),
    };
  }

  /** The master device's ring counters (see UblkDevice.stats). */
  masterStats(): object {
    return { ...this.master.stats, cpu: process.cpuUsage() };
  }

  /** Takes the snapshot and adds the slave device showing it. */
  enable(options: { wait?: boolean; slaveId?: number } = {}): Promise<string> {
    return this.serialize(async () => {
      this.checkRunning();
      await this.volume.enable({ wait: options.wait });
      this.slave = await this.addSlave(options.slaveId);
      return this.slave.path;
    });
  }

  /** Removes the slave device (EBUSY while it is in use) and starts the resync. */
  disable(): Promise<void> {
    return this.serialize(async () => {
      this.checkRunning();
      if (this.volume.state !== 'snapshot') {
        throw new CldError('CLDD_STATE', `the slave is not enabled (the state is ${this.volume.state})`);
      }
      if (this.slave) {
        await refuseIfBusy(this.slave.path);
        await this.slave.stop();
        this.slave = null;
      }
      await this.volume.disable();
      this.startResync();
    });
  }

  /** Stops the resync, both devices (STOP_DEV, drain, DEL_DEV) and closes the volume. Idempotent. */
  stop(): Promise<void> {
    this.stopping ??= (async () => {
      await this.transition.catch(() => {});
      await this.resync?.stop().catch(() => {});
      const failures: unknown[] = [];
      if (this.slave) await this.slave.stop().catch((err) => failures.push(err));
      await this.master.stop().catch((err) => failures.push(err));
      await this.volume.close().catch((err) => failures.push(err));
      this.control.close();
      if (failures.length) throw failures[0];
    })();
    return this.stopping;
  }

  private async addSlave(id?: number): Promise<UblkDevice> {
    return UblkDevice.create(this.control, this.volume, this.store.fd, 'slave', { ...this.queueOptions, id, flags: this.flags });
  }

  private startResync(): void {
    if (this.volume.state !== 'resync') return;
    // The store runs the merges' extents through io_uring on the same fd as the queues.
    this.resync ??= new ResyncScheduler(this.volume, this.store);
    void this.resync.start();
  }

  private checkRunning(): void {
    if (this.stopping) throw new CldError('CLDD_CLOSED', 'the device server is stopping');
  }

  private serialize<T>(fn: () => Promise<T>): Promise<T> {
    const next = this.transition.catch(() => {}).then(fn);
    this.transition = next;
    return next;
  }
}

async function refuseIfBusy(path: string): Promise<void> {
  let handle;
  try {
    handle = await fs.open(path, fsConstants.O_RDONLY | fsConstants.O_EXCL);
  } catch (err) {
    if ((err as { code?: string }).code === 'EBUSY') {
      throw new CldError('EBUSY', `the slave ${path} is in use (mounted or open exclusively): release it before disabling`, { cause: err });
    }
    return;
  }
  await handle.close();
}

function definedOnly<T extends object>(o: T): Partial<T> {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)) as Partial<T>;
}
