/**
 * Tier 2, on the host: what the ublk layer does without a kernel ublk driver, and the pieces
 * that do not need one. The real devices are tested in test/ublk-vm.test.ts.
 */
import { existsSync } from 'node:fs';
import { describe, expect, test } from 'vitest';
import { addon } from '../src/native/addon.js';
import { UblkControl } from '../src/ublk/control.js';
import { encodeControlOp } from '../src/ublk/uapi.js';

const hostHasUblk = existsSync('/dev/ublk-control');

describe('ublk control without the driver', () => {
  // The host this project is developed on has no ublk driver, so this is the ENODEV path; on a
  // host with the driver the same test checks that the control device answers instead.
  test(hostHasUblk ? 'with the driver loaded, the control device answers GET_FEATURES (null before 6.5)' : 'opening /dev/ublk-control fails with ENODEV and says how to fix it', async () => {
    if (hostHasUblk) {
      const control = UblkControl.open();
      const features = await control.getFeatures();
      expect(features === null || typeof features === 'number').toBe(true);
      control.close();
      return;
    }
    let error: unknown;
    try {
      UblkControl.open();
    } catch (err) {
      error = err;
    }
    expect(error).toMatchObject({
      code: 'ENODEV',
      message: "the kernel's ublk driver is not loaded (modprobe ublk_drv; needs Linux 6.0+)",
    });
  });

  test('serving a device that does not exist fails with the errno of opening /dev/ublkcN', () => {
    const { Device } = addon();
    expect(
      () =>
        new Device({ devId: 4094, queues: 1, depth: 4, bufferBytes: 65536, backingFd: 0, ioctlEncode: true, zeroCopy: false, userCopy: false, target: 'master', onEvents: () => {}, events: new Float64Array(52) }),
    ).toThrow(expect.objectContaining({ code: 'ENOENT', message: expect.stringContaining('/dev/ublkc4094') }));
  });

  test('bad queue geometry is refused before the kernel is asked', () => {
    const { Device } = addon();
    expect(
      () => new Device({ devId: 0, queues: 1, depth: 5000, bufferBytes: 65536, backingFd: 0, ioctlEncode: true, zeroCopy: false, userCopy: false, target: 'master', onEvents: () => {}, events: new Float64Array(45000) }),
    ).toThrow(expect.objectContaining({ code: 'EINVAL' }));
    // The events buffer every delivery goes through must hold a full queue's worth.
    expect(
      () => new Device({ devId: 0, queues: 1, depth: 4, bufferBytes: 65536, backingFd: 0, ioctlEncode: true, zeroCopy: false, userCopy: false, target: 'master', onEvents: () => {}, events: new Float64Array(35) }),
    ).toThrow(expect.objectContaining({ code: 'EINVAL', message: expect.stringContaining('events buffer') }));
  });
});

describe('ioctl-encoded control opcodes', () => {
  test('match the kernel UAPI values', () => {
    // _IOWR('u', 0x04, struct ublksrv_ctrl_cmd) and friends, as computed by the kernel headers.
    expect(encodeControlOp(0x04, true)).toBe(0xc0207504); // UBLK_U_CMD_ADD_DEV
    expect(encodeControlOp(0x06, true)).toBe(0xc0207506); // UBLK_U_CMD_START_DEV
    expect(encodeControlOp(0x02, false)).toBe(0x80207502); // UBLK_U_CMD_GET_DEV_INFO
    expect(encodeControlOp(0x13, false)).toBe(0x80207513); // UBLK_U_CMD_GET_FEATURES
    expect(encodeControlOp(0x01, false)).toBe(0x80207501); // UBLK_U_CMD_GET_QUEUE_AFFINITY
  });
});
