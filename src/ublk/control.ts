/**
 * The ublk control plane: /dev/ublk-control commands (their structures are in uapi.ts), and the opcode
 * negotiation. Kernels from 6.5 answer GET_FEATURES; when it lists UBLK_F_CMD_IOCTL_ENCODE only
 * the ioctl-encoded opcodes are used. Without GET_FEATURES (6.0-6.4) each command is sent
 * encoded first and, when the kernel does not know it (ENOTSUPP, shown as EOPNOTSUPP), again
 * with its legacy number. What the kernel changed in ADD_DEV (queue count, buffer size, flags)
 * is read back, never assumed.
 */
import { within } from '../deadline.js';
import { CldError, asCldError } from '../errors.js';
import { addon } from '../native/addon.js';
import type { NativeControlHandle } from '../native/native.js';
import { ANY_ID, CMD, type CommandName, DEV_INFO, DEV_STATE, type DevState, NO_QUEUE, PARAM_TYPE, PARAMS, READ_ONLY_CMDS, UBLK_F, encodeControlOp } from './uapi.js';

/**
 * The largest logical block a ublk device takes: the kernel refuses blocks larger than the page
 * size (4096 on x86-64). cldd's format allows larger blocks, but such a store cannot be served.
 */
export const MAX_DEVICE_BLOCK_SIZE = 4096;

/** What cldd's zero copy needs of a device. */
const ZERO_COPY = UBLK_F.AUTO_BUF_REG | UBLK_F.USER_COPY;

/** Whether device (or feature) flags have everything cldd's zero copy needs. */
export function hasZeroCopy(flags: number): boolean {
  return (flags & ZERO_COPY) === ZERO_COPY;
}

/** Commands that exist only ioctl-encoded. */
const ENCODED_ONLY = new Set<CommandName>(['GET_FEATURES']);
export interface DeviceInfo {
  id: number;
  queues: number;
  depth: number;
  state: DevState;
  bufferBytes: number;
  /** The pid of the serving process, as START_DEV or END_USER_RECOVERY recorded it. */
  serverPid: number;
  flags: number;
}

export interface AddOptions {
  /** A chosen device id, or undefined for the kernel to pick one. */
  id?: number;
  queues: number;
  depth: number;
  bufferBytes: number;
  flags: number;
}

export interface DeviceParams {
  capacity: number;
  blockSize: number;
  attrs: number;
  /** Largest request, bytes (at most the I/O buffer). */
  maxIoBytes: number;
  /** Largest discard and write-zeroes request, bytes (0: none). */
  maxDiscardBytes: number;
}

/**
 * The commands that wait for a device's I/O, which their callers bound with what they know of
 * it: START_DEV and END_USER_RECOVERY (UblkDevice.untilServing, which cancels them), STOP_DEV
 * (UblkDevice.stop, which names the requests the kernel waits for) and DEL_DEV (deleteWithin).
 */
const CALLER_BOUNDED: ReadonlySet<CommandName> = new Set(['START_DEV', 'END_USER_RECOVERY', 'STOP_DEV', 'DEL_DEV']);
/**
 * Every other command the kernel answers at once (START_USER_RECOVERY answers EBUSY rather than
 * wait). One that has not answered after this long is stuck in the driver.
 */
export const COMMAND_BOUND_MS = 30_000;

export class UblkControl {
  private features: number | null = null;
  private negotiated = false;
  private closed = false;
  /** The token of the last cancellable command (cancel() names a command by it). */
  private nextToken = 0;

  private constructor(private readonly handle: NativeControlHandle) {}

  /** Opens /dev/ublk-control. ENODEV when the driver is not loaded. */
  static open(): UblkControl {
    const { Control } = addon();
    try {
      return new UblkControl(new Control());
    } catch (err) {
      throw asCldError(err);
    }
  }

  /**
   * The device flags to ask for: user recovery is required (a server restart must not take the
   * disks away), its reissue variant preferred, ioctl-encoded commands where the kernel has them,
   * and zero copy where the kernel has it, unless turned off: large requests are read and
   * written in place (automatic buffer registration), small ones copied by the server itself
   * (user copy), see native/device.cc. Without zero copy, user copy where the kernel has it
   * (6.5+): the server then copies each request itself through small buffers, instead of the
   * kernel copying it into a buffer per tag as large as the largest request, which cost the
   * daemon depth x 1 MiB of memory once large requests had used every tag.
   */
  async negotiateFlags(options: { zeroCopy: boolean }): Promise<number> {
    const features = await this.getFeatures();
    let flags = UBLK_F.USER_RECOVERY | UBLK_F.USER_RECOVERY_REISSUE;
    // Before 6.5 there is no GET_FEATURES: the kernel keeps the flags it knows, and the caller
    // checks ADD_DEV's answer.
    if (features === null) return flags | UBLK_F.CMD_IOCTL_ENCODE;
    if ((features & UBLK_F.USER_RECOVERY) === 0) {
      throw new CldError('EOPNOTSUPP', "the kernel's ublk driver has no user recovery (UBLK_F_USER_RECOVERY, Linux 6.1+)");
    }
    if ((features & UBLK_F.USER_RECOVERY_REISSUE) === 0) flags &= ~UBLK_F.USER_RECOVERY_REISSUE;
    if (features & UBLK_F.CMD_IOCTL_ENCODE) flags |= UBLK_F.CMD_IOCTL_ENCODE;
    if (options.zeroCopy && hasZeroCopy(features)) flags |= ZERO_COPY;
    else if (features & UBLK_F.USER_COPY) flags |= UBLK_F.USER_COPY;
    return flags;
  }

  /** The kernel's feature flags, or null for kernels without GET_FEATURES (before 6.5). */
  async getFeatures(): Promise<number | null> {
    if (this.negotiated) return this.features;
    const buf = new Uint8Array(8);
    try {
      await this.bounded('ublk GET_FEATURES', this.handle.command(encodeControlOp(CMD.GET_FEATURES, false), ANY_ID, NO_QUEUE, 0, buf, 'ublk GET_FEATURES'));
      this.features = Number(new DataView(buf.buffer).getBigUint64(0, true) & 0xffffffffn);
    } catch (err) {
      const code = (err as { code?: string }).code;
      if (code !== 'EOPNOTSUPP' && code !== 'EINVAL' && code !== 'ENOTTY') throw asCldError(err);
      this.features = null;
    }
    this.negotiated = true;
    return this.features;
  }

  /**
   * Sends a command. `signal` cancels it while it waits in the kernel (START_DEV and
   * END_USER_RECOVERY wait for every tag's fetch); the command then fails, usually with EINTR.
   */
  private async send(name: CommandName, devId: number, data0: number, buffer: Uint8Array | null, signal?: AbortSignal): Promise<number> {
    if (this.closed) throw new CldError('CLDD_CLOSED', `ublk ${name}: the control handle is closed`);
    await this.getFeatures();
    const label = `ublk ${name}${devId === ANY_ID ? '' : ` of device ${devId}`}`;
    const encoded = encodeControlOp(CMD[name], !READ_ONLY_CMDS.has(name));
    const encodingKnown = this.features !== null && (this.features & UBLK_F.CMD_IOCTL_ENCODE) !== 0;
    const sent = (op: number) => {
      const answer = this.cancellable(op, devId, data0, buffer, label, signal);
      return CALLER_BOUNDED.has(name) ? answer : this.bounded(label, answer);
    };
    try {
      return await sent(encoded);
    } catch (err) {
      const code = (err as { code?: string }).code;
      if (encodingKnown || ENCODED_ONLY.has(name) || code !== 'EOPNOTSUPP') throw asCldError(err);
    }
    try {
      return await sent(CMD[name]);
    } catch (err) {
      throw asCldError(err);
    }
  }

  /** `answer`, or ETIMEDOUT naming the command once COMMAND_BOUND_MS have passed. */
  private bounded<T>(label: string, answer: Promise<T>): Promise<T> {
    return within(answer, COMMAND_BOUND_MS, () => new CldError('ETIMEDOUT', `${label} did not finish within ${COMMAND_BOUND_MS / 1000} s: the kernel's ublk driver did not answer`));
  }

  private async cancellable(op: number, devId: number, data0: number, buffer: Uint8Array | null, label: string, signal?: AbortSignal): Promise<number> {
    if (!signal) return this.handle.command(op, devId, NO_QUEUE, data0, buffer, label);
    if (signal.aborted) throw new CldError('ECANCELED', `${label}: cancelled before it was sent`);
    const token = (this.nextToken = (this.nextToken % 0xffffffff) + 1);
    const cancel = () => {
      try {
        this.handle.cancel(token);
      } catch {
        // The ring refused the cancel: the caller's own bound still ends the wait.
      }
    };
    signal.addEventListener('abort', cancel, { once: true });
    try {
      return await this.handle.command(op, devId, NO_QUEUE, data0, buffer, label, token);
    } finally {
      signal.removeEventListener('abort', cancel);
    }
  }

  /** ADD_DEV; returns what the kernel made of the request. */
  async add(options: AddOptions): Promise<DeviceInfo> {
    const buf = new Uint8Array(DEV_INFO.size);
    const v = new DataView(buf.buffer);
    const id = options.id ?? ANY_ID;
    v.setUint16(DEV_INFO.nrHwQueues, options.queues, true);
    v.setUint16(DEV_INFO.queueDepth, options.depth, true);
    v.setUint32(DEV_INFO.maxIoBufBytes, options.bufferBytes, true);
    v.setUint32(DEV_INFO.devId, id, true);
    v.setBigUint64(DEV_INFO.flags, BigInt(options.flags), true);
    try {
      await this.send('ADD_DEV', id, 0, buf);
    } catch (err) {
      const e = asCldError(err);
      if (e.code === 'EEXIST') throw new CldError('EEXIST', `ublk device ${id} already exists`, { cause: err });
      throw e;
    }
    return decodeInfo(buf);
  }

  async setParams(id: number, p: DeviceParams): Promise<void> {
    const shift = Math.log2(p.blockSize);
    if (!Number.isInteger(shift) || shift < 9 || p.blockSize > MAX_DEVICE_BLOCK_SIZE) {
      throw new CldError('EINVAL', `block size ${p.blockSize} is not a power of two from 512 to the page size (${MAX_DEVICE_BLOCK_SIZE})`);
    }
    const buf = new Uint8Array(PARAMS.size);
    const v = new DataView(buf.buffer);
    const { header, basic, discard } = PARAMS;
    v.setUint32(header.len, PARAMS.len, true);
    v.setUint32(header.types, PARAM_TYPE.basic | (p.maxDiscardBytes > 0 ? PARAM_TYPE.discard : 0), true);
    v.setUint32(basic.attrs, p.attrs, true);
    v.setUint8(basic.logicalBsShift, shift);
    v.setUint8(basic.physicalBsShift, shift);
    v.setUint8(basic.ioOptShift, shift);
    v.setUint8(basic.ioMinShift, shift);
    v.setUint32(basic.maxSectors, Math.floor(p.maxIoBytes / 512), true);
    v.setUint32(basic.chunkSectors, 0, true); // no chunk boundaries
    v.setBigUint64(basic.devSectors, BigInt(Math.floor(p.capacity / 512)), true);
    v.setBigUint64(basic.virtBoundaryMask, 0n, true);
    // discard: one range per request, whole blocks
    if (p.maxDiscardBytes > 0) {
      v.setUint32(discard.alignment, 0, true);
      v.setUint32(discard.granularity, p.blockSize, true);
      v.setUint32(discard.maxDiscardSectors, Math.floor(p.maxDiscardBytes / 512), true);
      v.setUint32(discard.maxWriteZeroesSectors, Math.floor(p.maxDiscardBytes / 512), true);
      v.setUint16(discard.maxDiscardSegments, 1, true);
    }
    await this.send('SET_PARAMS', id, 0, buf);
  }

  /**
   * START_DEV: returns once every tag has a FETCH and the partition scan is done. The kernel
   * waits for the fetches without a bound: `signal` interrupts it (UblkDevice bounds it).
   */
  async start(id: number, signal?: AbortSignal): Promise<void> {
    await this.send('START_DEV', id, process.pid, null, signal);
  }

  async stop(id: number): Promise<void> {
    await this.send('STOP_DEV', id, 0, null);
  }

  /** DEL_DEV: waits until every reference to /dev/ublkcN is gone. */
  async delete(id: number): Promise<void> {
    await this.send('DEL_DEV', id, 0, null);
  }

  async info(id: number): Promise<DeviceInfo> {
    const buf = new Uint8Array(DEV_INFO.size);
    await this.send('GET_DEV_INFO', id, 0, buf);
    return decodeInfo(buf);
  }

  /**
   * GET_QUEUE_AFFINITY: the CPUs whose requests go to queue `q` of device `id` (blk-mq's map).
   * The kernel wants room for every possible CPU, in whole longs: 1,024 bytes hold 8,192, the
   * largest NR_CPUS.
   */
  async queueAffinity(id: number, q: number): Promise<number[]> {
    const buf = new Uint8Array(1024);
    await this.send('GET_QUEUE_AFFINITY', id, q, buf);
    const cpus: number[] = [];
    buf.forEach((byte, i) => {
      for (let bit = 0; bit < 8; bit++) if (byte & (1 << bit)) cpus.push(i * 8 + bit);
    });
    return cpus;
  }

  async startRecovery(id: number): Promise<void> {
    await this.send('START_USER_RECOVERY', id, 0, null);
  }

  /** END_USER_RECOVERY: returns once every tag has a FETCH again; `signal` as for start(). */
  async endRecovery(id: number, signal?: AbortSignal): Promise<void> {
    await this.send('END_USER_RECOVERY', id, process.pid, null, signal);
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.handle.close();
  }
}

function decodeInfo(buf: Uint8Array): DeviceInfo {
  const v = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const state = v.getUint16(DEV_INFO.state, true);
  return {
    queues: v.getUint16(DEV_INFO.nrHwQueues, true),
    depth: v.getUint16(DEV_INFO.queueDepth, true),
    state: DEV_STATE[state] ?? 'unknown',
    bufferBytes: v.getUint32(DEV_INFO.maxIoBufBytes, true),
    id: v.getUint32(DEV_INFO.devId, true),
    serverPid: v.getInt32(DEV_INFO.ublksrvPid, true),
    flags: Number(v.getBigUint64(DEV_INFO.flags, true) & 0xffffffffn),
  };
}
