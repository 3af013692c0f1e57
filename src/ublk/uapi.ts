/**
 * The kernel's ublk interface as the control plane uses it (include/uapi/linux/ublk_cmd.h):
 * opcodes, flags, and the byte layout of the structures control commands carry. The I/O path's
 * structures (the descriptor array, the I/O command) are the addon's, in native/ublk.h: each
 * kernel structure is described once, on the side that reads it.
 */

/** Device feature flags (UBLK_F_*), the ones cldd asks for or reports. */
export const UBLK_F = {
  URING_CMD_COMP_IN_TASK: 1 << 1,
  NEED_GET_DATA: 1 << 2,
  USER_RECOVERY: 1 << 3,
  USER_RECOVERY_REISSUE: 1 << 4,
  UNPRIVILEGED_DEV: 1 << 5,
  CMD_IOCTL_ENCODE: 1 << 6,
  USER_COPY: 1 << 7,
  ZONED: 1 << 8,
  USER_RECOVERY_FAIL_IO: 1 << 9,
  /** Linux 6.16+: each request's pages are registered in the server's io_uring (zero copy). */
  AUTO_BUF_REG: 1 << 11,
} as const;

/** Device attributes (UBLK_ATTR_*), in the basic parameters. */
export const UBLK_ATTR = { READ_ONLY: 1 << 0, ROTATIONAL: 1 << 1, VOLATILE_CACHE: 1 << 2, FUA: 1 << 3 } as const;

/** Device states (UBLK_S_DEV_*), by number. */
export const DEV_STATE = ['dead', 'live', 'quiesced', 'fail-io'] as const;
export type DevState = (typeof DEV_STATE)[number] | 'unknown';

/** Request opcodes (UBLK_IO_OP_*) the engine serves, by number. */
export const IO_OP = { 0: 'read', 1: 'write', 2: 'flush', 3: 'discard', 5: 'write-zeroes' } as const;

/** Control command numbers (UBLK_CMD_*; the legacy opcodes, and nr of the encoded ones). */
export const CMD = {
  GET_QUEUE_AFFINITY: 0x01,
  GET_DEV_INFO: 0x02,
  ADD_DEV: 0x04,
  DEL_DEV: 0x05,
  START_DEV: 0x06,
  STOP_DEV: 0x07,
  SET_PARAMS: 0x08,
  GET_PARAMS: 0x09,
  START_USER_RECOVERY: 0x10,
  END_USER_RECOVERY: 0x11,
  GET_FEATURES: 0x13,
} as const;
export type CommandName = keyof typeof CMD;

/** Commands that only read (_IOR); the rest are _IOWR. */
export const READ_ONLY_CMDS = new Set<CommandName>(['GET_QUEUE_AFFINITY', 'GET_DEV_INFO', 'GET_PARAMS', 'GET_FEATURES']);

/** sizeof(struct ublksrv_ctrl_cmd). */
const CTRL_CMD_SIZE = 32;
const IOC_READ = 2;
const IOC_READ_WRITE = 3;

/** _IOR/_IOWR('u', nr, struct ublksrv_ctrl_cmd). */
export function encodeControlOp(nr: number, write: boolean): number {
  return (((write ? IOC_READ_WRITE : IOC_READ) << 30) | (CTRL_CMD_SIZE << 16) | (0x75 << 8) | nr) >>> 0;
}

/** A command's device id asking the kernel to choose (ADD_DEV), and "no queue". */
export const ANY_ID = 0xffffffff;
export const NO_QUEUE = 0xffff;

/** struct ublksrv_ctrl_dev_info: byte offsets of the members cldd reads or writes. */
export const DEV_INFO = {
  size: 64,
  nrHwQueues: 0, // u16
  queueDepth: 2, // u16
  state: 4, // u16
  maxIoBufBytes: 8, // u32
  devId: 12, // u32
  ublksrvPid: 16, // s32
  flags: 24, // u64
} as const;

/**
 * struct ublk_params with its basic and discard parts: byte offsets. `len` covers the header and
 * both parts, rounded as the 6.1 structure is.
 */
export const PARAMS = {
  size: 128,
  len: 64,
  header: { len: 0, types: 4 }, // u32, u32
  basic: {
    attrs: 8, // u32
    logicalBsShift: 12, // u8
    physicalBsShift: 13,
    ioOptShift: 14,
    ioMinShift: 15,
    maxSectors: 16, // u32
    chunkSectors: 20, // u32
    devSectors: 24, // u64
    virtBoundaryMask: 32, // u64
  },
  discard: {
    alignment: 40, // u32
    granularity: 44, // u32
    maxDiscardSectors: 48, // u32
    maxWriteZeroesSectors: 52, // u32
    maxDiscardSegments: 56, // u16
  },
} as const;
export const PARAM_TYPE = { basic: 1 << 0, discard: 1 << 1 } as const;
