import { readdir, stat } from 'node:fs/promises';
import type { Volume } from '../engine/volume.js';
import { NativeStore } from '../io/native-store.js';
import { hasZeroCopy, UblkControl } from '../ublk/control.js';
import { UBLK_F } from '../ublk/uapi.js';
import { DEFAULT_QUEUE_OPTIONS, type OutstandingRequest, type QueueOptions, UblkDevice } from '../ublk/device.js';
import { disableScheduler, ioctlFreezer, limitDaemonMemory, sdNotify, writesZeroes } from '../system/system.js';
import type { Backend, StartDevicesOptions } from './daemon.js';
import type { Logger } from './logger.js';
import type { DeviceLayout } from '../protocol/methods.js';
import type { DeviceInfo, PairDevices } from './pair-service.js';

/** The daemon's real backend: io_uring store, ublk devices, fsfreeze, sd_notify. */
export async function ublkBackend(log: Logger): Promise<Backend> {
  try {
    limitDaemonMemory();
  } catch (err) {
    log.warn(`memory settings not made: ${err instanceof Error ? err.message : String(err)}`);
  }
  return {
    async open(path) {
      // flock refuses a second daemon on the same file; O_EXCL does it for block devices.
      const store = NativeStore.open(path, { lock: true });
      return { store, executor: store };
    },
    startDevices: (volume, store, options) => UblkPair.start(volume, store as NativeStore, options),
    freezer: ioctlFreezer,
    notify: (message) => {
      try {
        sdNotify(message);
      } catch (err) {
        log.warn(`sd_notify failed: ${err instanceof Error ? err.message : String(err)}`);
      }
    },
  };
}

/**
 * How old a request may get before the daemon reports it (CLDD_STALL_REPORT_MS overrides it).
 * A flush of a busy backing disk can take seconds; nothing healthy takes half a minute.
 */
const STALL_REPORT_MS = 30_000;

/**
 * The slave device a dead daemon served, if any. The state file names it, but may be behind: a
 * full /run kept it from being written when the slave changed (daemon.ts, linkKeeper). So the
 * named device is taken only if the dead daemon served it (the kernel keeps the server's pid
 * until a new server takes over), and failing that any other device it served besides the
 * master: a daemon serves two at most. Taking a device by a stale id could take over another
 * pair's slave, or fail every restart on a device that is gone.
 */
async function slaveLeftBy(control: UblkControl, recover: { master: number; slave: number | null; pid: number }, log: Logger): Promise<number | null> {
  const servedByDead = async (id: number) => (await control.info(id).catch(() => null))?.serverPid === recover.pid;
  if (recover.slave !== null && recover.slave !== recover.master && (await servedByDead(recover.slave))) return recover.slave;
  const ids = (await readdir('/dev').catch(() => [] as string[])).flatMap((e) => {
    const m = /^ublkc(\d+)$/.exec(e);
    return m ? [Number(m[1])] : [];
  });
  for (const id of ids.sort((a, b) => a - b)) {
    if (id !== recover.master && (await servedByDead(id))) {
      log.warn(`the state file names ${recover.slave === null ? 'no slave' : `slave device ${recover.slave}`}, but the dead daemon (pid ${recover.pid}) served device ${id}: taking that over as its slave`);
      return id;
    }
  }
  if (recover.slave !== null) log.warn(`the state file names slave device ${recover.slave}, which the dead daemon (pid ${recover.pid}) no longer served: no slave taken over`);
  return null;
}

/** Master and slave as ublk devices, with user recovery so that a restart keeps them. */
class UblkPair implements PairDevices {
  private slaveDevice: UblkDevice | null = null;

  private constructor(
    private readonly control: UblkControl,
    private readonly volume: Volume,
    private readonly store: NativeStore,
    private readonly masterDevice: UblkDevice,
    private readonly queueOptions: QueueOptions,
    private readonly flags: number,
    readonly recovered: boolean,
    private readonly log: Logger,
  ) {
    this.watch(masterDevice);
  }

  /** Logs requests outstanding far too long, with where they wait (UblkDevice.watch). */
  private watch(device: UblkDevice): UblkDevice {
    const stallMs = Number(process.env.CLDD_STALL_REPORT_MS) > 0 ? Number(process.env.CLDD_STALL_REPORT_MS) : STALL_REPORT_MS;
    device.watch({
      stallMs,
      report: (message) => this.log.warn(`stalled requests: ${message}`),
      outOfService: (message) => this.log.error(`a queue thread reported: ${message}`),
    });
    return device;
  }

  outstanding(): { device: string; requests: OutstandingRequest[] }[] {
    const devices = [this.masterDevice, ...(this.slaveDevice ? [this.slaveDevice] : [])];
    return devices.map((d) => ({ device: d.path, requests: d.outstanding() }));
  }

  static async start(volume: Volume, store: NativeStore, options: StartDevicesOptions): Promise<UblkPair> {
    const queueOptions = { ...DEFAULT_QUEUE_OPTIONS, queues: options.queues, depth: options.depth, pollMicros: options.pollMicros };
    const control = UblkControl.open();
    try {
      if (options.recover) {
        const master = await UblkDevice.recover(control, volume, store.fd, 'master', options.recover.master, { pollMicros: options.pollMicros });
        // The kernel keeps the layout the devices were created with; a slave added later matches it.
        const layout = { ...queueOptions, queues: master.info.queues, depth: master.info.depth };
        const pair = new UblkPair(control, volume, store, master, layout, master.info.flags, true, options.log);
        options.log.info(`reattached the master ${master.path} (user recovery)`);
        logCpus(master, options.log);
        const slaveId = await slaveLeftBy(control, options.recover, options.log);
        if (slaveId !== null) {
          const slave = await UblkDevice.recover(control, volume, store.fd, 'slave', slaveId, { pollMicros: options.pollMicros });
          if (volume.state === 'snapshot') {
            pair.slaveDevice = pair.watch(slave);
            logCpus(slave, options.log);
          } else await slave.stop(); // the old daemon died while disabling: nothing left to show
        }
        return pair;
      }
      const flags = await control.negotiateFlags({ zeroCopy: options.zeroCopy });
      const maxDiscardBytes = (await takesDiscards(store, options.log)) ? queueOptions.maxDiscardBytes : 0;
      const master = await UblkDevice.create(control, volume, store.fd, 'master', { ...queueOptions, flags, maxDiscardBytes });
      logCpus(master, options.log);
      if (hasZeroCopy(master.info.flags)) options.log.info('zero copy: large requests are read and written in place');
      else if (master.info.flags & UBLK_F.USER_COPY) options.log.info('user copy: the queue threads copy requests themselves, through small buffers');
      await withoutScheduler(master, options.log);
      return new UblkPair(control, volume, store, master, queueOptions, flags, false, options.log);
    } catch (err) {
      control.close();
      throw err;
    }
  }

  get layout(): DeviceLayout {
    const { queues, depth, flags } = this.masterDevice.info;
    return { queues, depth, zeroCopy: hasZeroCopy(flags) };
  }

  get master(): DeviceInfo {
    return { id: this.masterDevice.id, path: this.masterDevice.path };
  }

  get slave(): DeviceInfo | null {
    return this.slaveDevice ? { id: this.slaveDevice.id, path: this.slaveDevice.path } : null;
  }

  async addSlave(): Promise<DeviceInfo> {
    if (!this.slaveDevice) {
      this.slaveDevice = this.watch(
        await UblkDevice.create(this.control, this.volume, this.store.fd, 'slave', { ...this.queueOptions, flags: this.flags }),
      );
      logCpus(this.slaveDevice, this.log);
      await withoutScheduler(this.slaveDevice, this.log);
    }
    return this.slave!;
  }

  /** Stops and deletes the slave; until that succeeds the pair still has it (a stop can be retried). */
  async removeSlave(): Promise<void> {
    const slave = this.slaveDevice;
    await slave?.stop();
    if (this.slaveDevice === slave) this.slaveDevice = null;
  }

  async stop(): Promise<void> {
    const failures: unknown[] = [];
    await this.removeSlave().catch((err) => failures.push(err));
    await this.masterDevice.stop().catch((err) => failures.push(err));
    // A device whose stop failed keeps its queues, and a retry needs the control handle.
    if (failures.length) throw failures[0];
    this.control.close();
  }
}

/**
 * Whether the master may take discards and writes of zeros: only where the backing store can
 * make a range read as zeros without writing it (a punch), for otherwise every one fails. The
 * kernel then zeroes by writing zeros itself, and fstrim says the master cannot discard.
 */
async function takesDiscards(store: NativeStore, log: Logger): Promise<boolean> {
  try {
    // A block device: the one the store opened (with O_EXCL), not its path again.
    const can = store.isBlockDevice ? await writesZeroes((await stat(`/proc/self/fd/${store.fd}`)).rdev) : store.punchesHoles();
    if (can) return true;
    const why = store.isBlockDevice ? 'its queue takes no write zeroes' : 'its file system punches no holes';
    log.info(`${store.description} cannot zero a range without writing it (${why}): the master takes no discards`);
  } catch (err) {
    log.warn(`${store.description}: could not tell whether it can zero a range without writing it (${err instanceof Error ? err.message : String(err)}): the master takes no discards`);
  }
  return false;
}

/** A device keeps working with the kernel's scheduler, only slower: say so, do not fail. */
async function withoutScheduler(device: UblkDevice, log: Logger): Promise<void> {
  await disableScheduler(device.path).catch((err: unknown) =>
    log.warn(`${device.path}: could not turn off the I/O scheduler: ${err instanceof Error ? err.message : String(err)}`),
  );
}

/** Where the master's queue threads run (src/ublk/affinity.ts). */
function logCpus(device: UblkDevice, log: Logger): void {
  const where = device.cpus.map((cpu, q) => `queue ${q} ${cpu < 0 ? 'not pinned' : `on CPU ${cpu}`}`);
  log.info(`${device.path}: ${where.join(', ')}`);
}
