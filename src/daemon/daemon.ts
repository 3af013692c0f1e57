import { existsSync, renameSync } from 'node:fs';
import { mkdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { CldError } from '../errors.js';
import type { Executor } from '../engine/plan.js';
import { ResyncScheduler } from '../engine/resync.js';
import { uuidString } from '../format/format.js';
import { MapJournal } from '../format/map-journal.js';
import { Volume } from '../engine/volume.js';
import type { BlockStore } from '../io/block-store.js';
import { DaemonClient } from '../protocol/client.js';
import type { PairConfig } from '../protocol/config.js';
import { ControlServer } from './control-server.js';
import { DeviceLinks } from './device-links.js';
import type { Freezer } from '../system/freeze.js';
import type { Logger } from './logger.js';
import { checkedHandlers, type DeviceLayout } from '../protocol/methods.js';
import { type LinkKeeper, type PairDevices, PairService } from './pair-service.js';
import { defaultPaths, type Paths, socketPath } from '../protocol/paths.js';
import { type DaemonState, isAlive, listStates, readState, removeState, writeState } from '../protocol/state-file.js';

export interface StartDevicesOptions {
  name: string;
  queues: number;
  depth: number;
  /** Ask for zero copy (UBLK_F_AUTO_BUF_REG) where the kernel has it. */
  zeroCopy: boolean;
  /** How long a queue thread polls for work before it sleeps, µs; 0: never. */
  pollMicros: number;
  /** Device ids a previous daemon left behind (after SIGKILL): reattach them with user recovery. */
  recover: { master: number; slave: number | null; pid: number } | null;
  log: Logger;
}

/** Opens the backing store and gives the executor that runs plans on it. */
export interface Backend {
  open(path: string): Promise<{ store: BlockStore; executor: Executor }>;
  startDevices: ((volume: Volume, store: BlockStore, options: StartDevicesOptions) => Promise<PairDevices>) | null;
  freezer: Freezer;
  /** sd_notify(3): READY=1, STOPPING=1, WATCHDOG=1, STATUS=... (no-op outside systemd). */
  notify(message: string): void;
}

/**
 * One daemon per pair: it owns the store, the engine, the devices and the control socket.
 * Start order makes READY true: devices exist and the socket listens before notify(READY=1).
 */
export class Daemon {
  private stopping: Promise<void> | null = null;
  private watchdog: NodeJS.Timeout | null = null;
  private resolveStopped!: () => void;
  private rejectStopped!: (err: unknown) => void;
  /**
   * Resolves once the daemon has stopped, however the stop was asked for; rejects with the
   * error of a stop that failed (a device the kernel would not stop): the process must not look
   * as if it had stopped cleanly.
   */
  readonly stopped = new Promise<void>((resolve, reject) => ((this.resolveStopped = resolve), (this.rejectStopped = reject)));

  readonly name: string;
  readonly service: PairService;
  private readonly volume: Volume;
  private readonly store: BlockStore;
  private readonly scheduler: ResyncScheduler;
  private readonly devices: PairDevices | null;
  private readonly control: ControlServer;
  private readonly state: DaemonState;
  private readonly paths: Paths;
  private readonly backend: Backend;
  private readonly links: DeviceLinks;
  private readonly log: Logger;

  private constructor(parts: DaemonParts) {
    this.stopped.catch(() => {}); // its awaiters get the error; nobody need await it
    ({ name: this.name, service: this.service, volume: this.volume, store: this.store, scheduler: this.scheduler, devices: this.devices } = parts);
    ({ control: this.control, state: this.state, paths: this.paths, backend: this.backend, links: this.links, log: this.log } = parts);
  }

  /**
   * Opens the store, recovers the engine, starts (or takes over) the devices, listens on the
   * socket and records the pair's state, in that order. A step that fails undoes the ones
   * before it, last first, and start() throws its error.
   */
  static async start(config: PairConfig & { name: string }, backend: Backend, log: Logger, paths: Paths = defaultPaths()): Promise<Daemon> {
    const { name } = config;
    await refuseIfRunning(paths, name);
    const backingId = await refuseIfAttached(paths, name, config.backing);
    const previous = await readState(paths, name);
    await mkdir(paths.runDir, { recursive: true, mode: 0o700 });

    const undo = new UndoStack();
    try {
      const { store, executor } = await backend.open(config.backing);
      undo.push(() => store.close());
      // The map journal lives on tmpfs beside the socket: it survives this process, not a reboot.
      const volume = await Volume.open(store, { journalPath: (uuid) => mapJournalPath(paths, name, uuid) });
      undo.push(() => volume.close());
      log.info(`opened ${config.backing}: state ${volume.state}, ${volume.map.count} blocks redirected`);
      const scheduler = new ResyncScheduler(volume, executor, { rateLimit: config.resyncRate });

      let devices: PairDevices | null = null;
      if (backend.startDevices) {
        const recover =
          previous?.master && !isAlive(previous.pid) && (await deviceExists(previous.master.path))
            ? { master: previous.master.id, slave: previous.slave?.id ?? null, pid: previous.pid }
            : null;
        devices = await backend.startDevices(volume, store, { name, queues: config.queues, depth: config.depth, zeroCopy: config.zeroCopy, pollMicros: config.pollMicros, recover, log });
        const started = devices;
        undo.push(() => started.stop());
      }
      const links = new DeviceLinks();
      const index = devices ? (previous?.index ?? (await links.freeIndex(preferredIndex(name)))) : null;
      if (devices && index !== null) {
        await links.create(name, index, devices.master.path, devices.slave?.path ?? null);
        undo.push(() => links.remove(name, index));
      }
      const state: DaemonState = {
        name,
        pid: process.pid,
        backing: config.backing,
        backingId,
        master: devices?.master ?? null,
        slave: devices?.slave ?? null,
        index,
        startedAt: Date.now(),
      };
      const service = new PairService(name, config.backing, volume, scheduler, devices, backend.freezer, log, linkKeeper(links, paths, state, log));
      let daemon: Daemon | null = null;
      const control = new ControlServer(socketPath(paths, name), name, handlers(service, () => daemon, log));
      undo.push(() => control.close());
      // A daemon restarted in snapshot (not by recovery, which kept the slave) adds its slave.
      await service.attachSlave();
      await control.listen();
      await writeState(paths, state);
      daemon = new Daemon({ name, service, volume, store, scheduler, devices, control, state, paths, backend, links, log });
      if (volume.state === 'resync') {
        log.info(`resuming the resync: ${volume.map.count} blocks left`);
        void scheduler.start();
      }
      daemon.startWatchdog();
      backend.notify(`READY=1\nSTATUS=${volume.state}${devices ? `, master ${devices.master.path}` : ''}\nMAINPID=${process.pid}`);
      log.info(`ready${devices ? `: master ${devices.master.path}${devices.slave ? `, slave ${devices.slave.path}` : ''}` : ''}`);
      return daemon;
    } catch (err) {
      await undo.unwind(log);
      throw err;
    }
  }

  get devicesInfo(): { master: string; slave: string | null; recovered: boolean; layout: DeviceLayout } | null {
    const d = this.devices;
    return d ? { master: d.master.path, slave: d.slave?.path ?? null, recovered: d.recovered, layout: d.layout } : null;
  }

  /**
   * Orderly stop: no new requests, the resync pauses (its progress is committed), the devices
   * stop after the I/O in flight, the engine commits, and the names go away. `force` finishes
   * a running resync first instead of refusing.
   */
  stop(options: { force?: boolean } = {}): Promise<void> {
    this.stopping ??= this.doStop(options).then(
      () => this.resolveStopped(),
      (err: unknown) => {
        this.log.error(`the stop failed: ${(err as Error).message}`);
        this.rejectStopped(err);
        throw err;
      },
    );
    return this.stopping;
  }

  private async doStop(options: { force?: boolean }): Promise<void> {
    this.backend.notify('STOPPING=1');
    if (this.watchdog) clearInterval(this.watchdog);
    if (options.force && this.volume.state === 'resync') {
      this.log.info('finishing the resync before stopping');
      await this.scheduler.start();
    }
    // Each step logged first: a stop that hangs says in the log where (cldd remove shows it).
    const step = (what: string) => this.log.info(`stopping: ${what}`);
    await this.control.close();
    step('pausing the resync');
    await this.scheduler.stop();
    if (this.devices) {
      step('stopping the devices (the kernel completes their requests first)');
      await this.devices.stop();
    }
    step('committing and closing the engine');
    await this.volume.close();
    await this.store.close();
    await this.links.remove(this.name, this.state.index);
    await removeState(this.paths, this.name);
    this.log.info('stopped');
  }

  private startWatchdog(): void {
    const usec = Number(process.env.WATCHDOG_USEC);
    const pid = Number(process.env.WATCHDOG_PID || process.pid);
    if (!usec || pid !== process.pid) return;
    // Ping at half the interval, but only while the engine still takes requests.
    this.watchdog = setInterval(() => {
      if (!this.volume.failed) this.backend.notify('WATCHDOG=1');
    }, Math.max(100, usec / 2000));
    this.watchdog.unref();
  }
}

/** What a Daemon is made of, as start() put it together. */
interface DaemonParts {
  name: string;
  service: PairService;
  volume: Volume;
  store: BlockStore;
  scheduler: ResyncScheduler;
  devices: PairDevices | null;
  control: ControlServer;
  state: DaemonState;
  paths: Paths;
  backend: Backend;
  links: DeviceLinks;
  log: Logger;
}

/** Releases, last first, what a start acquired before the step that failed. */
class UndoStack {
  private readonly steps: (() => Promise<unknown>)[] = [];

  push(step: () => Promise<unknown>): void {
    this.steps.push(step);
  }

  /**
   * Undoes the steps, last first. A step that fails stops the unwinding: what it undid may still
   * use what came before it (devices whose stop timed out still use the store's fd), so that is
   * left as it is. The start's own error is the one thrown, this one only logged.
   */
  async unwind(log: Logger): Promise<void> {
    const steps = this.steps.splice(0).reverse();
    for (const step of steps) {
      try {
        await step();
      } catch (err) {
        log.error(`undoing a failed start: ${(err as Error).message}; what was opened before it is left open`);
        return;
      }
    }
  }
}

/**
 * Keeps the /dev/cldd links and the state file in step with the slave (devices only). The slave
 * was added or removed when this runs, so a state file that cannot be written (a full /run) does
 * not fail the enable or disable that did it: that is logged, and the next write carries the
 * whole state. Until then a restart after a kill finds the old slave id, and takes over only a
 * device the dead daemon served (UblkPair.start).
 */
function linkKeeper(links: DeviceLinks, paths: Paths, state: DaemonState, log: Logger): LinkKeeper | null {
  const { name, index } = state;
  if (!state.master || index === null) return null;
  const record = async (): Promise<void> => {
    try {
      await writeState(paths, state);
    } catch (err) {
      log.error(`${(err as Error).message}; it still names ${state.slave ? 'no slave' : 'the removed slave'}`);
    }
  };
  return {
    slaveAdded: async (slave) => {
      await links.setSlave(name, index, slave.path);
      state.slave = slave;
      await record();
    },
    slaveRemoved: async () => {
      await links.setSlave(name, index, null);
      state.slave = null;
      await record();
    },
  };
}

/** The control socket's methods; `daemon()` is the daemon once it has started (stop needs it). */
function handlers(service: PairService, daemon: () => Daemon | null, log: Logger) {
  return checkedHandlers({
    status: async () => service.status(),
    requests: async () => ({ devices: service.requests() }),
    enable: async (p) => service.enable(p),
    disable: async () => service.disable(),
    progress: async (params) => service.progress(params.waitMs),
    changes: async (p) => service.changes(p),
    'resync-rate': async (p) => {
      service.setResyncRate(p.bytesPerSecond);
      return { bytesPerSecond: p.bytesPerSecond };
    },
    stop: async (p) => {
      // The socket listens a moment before start() has finished (the state file is written last).
      const running = daemon();
      if (!running) throw new CldError('EBUSY', 'the daemon is still starting: retry the stop');
      await service.checkStoppable(p.force === true);
      // Answer first, then stop: the client is waiting for this reply on the socket we close.
      setImmediate(() => void running.stop({ force: p.force === true }).catch((err) => log.error(String(err))));
      return { stopping: true as const };
    },
  });
}

export async function refuseIfRunning(paths: Paths, name: string): Promise<void> {
  try {
    const client = await DaemonClient.connect(socketPath(paths, name), name, 2000);
    const pid = client.hello.pid;
    client.close();
    throw new CldError('EBUSY', `pair "${name}" is already running (pid ${pid})`);
  } catch (err) {
    if (err instanceof CldError && err.code === 'ENOENT') return;
    throw err;
  }
}

/** Refuses a backing store another live pair holds; returns its identity (dev and ino, or rdev). */
export async function refuseIfAttached(paths: Paths, name: string, backing: string): Promise<string> {
  const backingId = await fileId(backing);
  for (const s of await listStates(paths)) {
    if (s.name !== name && s.backingId === backingId && isAlive(s.pid)) {
      throw new CldError('EBUSY', `${backing} is already attached as pair "${s.name}" (pid ${s.pid})`);
    }
  }
  return backingId;
}

/**
 * The map journal of the store with `uuid`, named after the store rather than the pair: a daemon
 * killed as pair "a" and reopened as pair "b" must find it, or "a"'s journal, replayed when the
 * store is next opened as "a", would bring back redirections of an older snapshot. A journal an
 * older cldd kept under the pair's name is moved to the store's name first.
 */
export function mapJournalPath(paths: Paths, name: string, uuid: Uint8Array): string {
  const path = join(paths.runDir, `${uuidString(uuid)}.mapjournal`);
  const legacy = join(paths.runDir, `${name}.mapjournal`);
  if (!existsSync(path) && MapJournal.belongsTo(legacy, uuid)) renameSync(legacy, path);
  return path;
}

/**
 * Refuses to format (`--force`) a backing store whose pair's daemon died with its devices still
 * up: they wait for a daemon to take them over (user recovery), and the filesystem on them would
 * find a reformatted store under it.
 */
export async function refuseIfRecoverable(paths: Paths, backing: string): Promise<void> {
  const backingId = await fileId(backing);
  for (const s of await listStates(paths)) {
    if (s.backingId === backingId && !isAlive(s.pid) && s.master && (await deviceExists(s.master.path))) {
      throw new CldError(
        'EBUSY',
        `${backing} is the store of pair "${s.name}", whose daemon died while ${s.master.path} stayed up waiting for it: ` +
          `cldd add ${backing} --name ${s.name} (without --force) takes the devices over; cldd remove --force ${s.name} drops them`,
      );
    }
  }
}

async function fileId(path: string): Promise<string> {
  try {
    const st = await stat(path);
    return st.isBlockDevice() ? `rdev:${st.rdev}` : `${st.dev}:${st.ino}`;
  } catch (err) {
    if ((err as { code?: string }).code === 'ENOENT') throw new CldError('ENOENT', `${path} does not exist`);
    throw err;
  }
}

/** clddsetup names pairs cldN after /dev/cldmN: such a pair gets short names with that N. */
function preferredIndex(name: string): number | undefined {
  const m = /^cld(\d+)$/.exec(name);
  return m ? Number(m[1]) : undefined;
}

async function deviceExists(path: string): Promise<boolean> {
  return stat(path).then(
    (st) => st.isBlockDevice(),
    () => false,
  );
}
