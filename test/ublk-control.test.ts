/**
 * Tier 1: the control plane's bounds, against a control device that never answers some
 * commands (the addon replaced in this file only). The real driver's answers are tested in
 * test/ublk-host.test.ts and test/ublk-vm.test.ts.
 */
import { afterEach, describe, expect, test, vi } from 'vitest';
import { CMD, UBLK_F, encodeControlOp } from '../src/ublk/uapi.js';

/** Opcodes (ioctl-encoded) the fake control device leaves unanswered. */
const silent = new Set<number>();
const pending: number[] = [];

vi.mock('../src/native/addon.js', () => ({
  addon: () => ({
    Control: class {
      command(op: number, _devId: number, _q: number, _data0: number, buffer: Uint8Array | null): Promise<number> {
        if (silent.has(op)) {
          pending.push(op);
          return new Promise(() => {});
        }
        // GET_FEATURES: ioctl-encoded commands only; every other command succeeds at once.
        if (op === encodeControlOp(CMD.GET_FEATURES, false) && buffer) new DataView(buffer.buffer).setBigUint64(0, BigInt(UBLK_F.CMD_IOCTL_ENCODE), true);
        return Promise.resolve(0);
      }
      cancel(): boolean {
        return false;
      }
      close(): void {}
    },
  }),
}));

const { COMMAND_BOUND_MS, UblkControl } = await import('../src/ublk/control.js');

afterEach(() => {
  vi.useRealTimers();
  silent.clear();
  pending.length = 0;
});

describe('ublk control commands are bounded', () => {
  test('a command the kernel answers at once fails with ETIMEDOUT naming it when it does not', async () => {
    vi.useFakeTimers();
    silent.add(encodeControlOp(CMD.SET_PARAMS, true));
    const control = UblkControl.open();
    const params = { capacity: 1 << 20, blockSize: 4096, attrs: 0, maxIoBytes: 1 << 20, maxDiscardBytes: 0 };
    const answer = control.setParams(3, params);
    const settled = expect(answer).rejects.toMatchObject({
      code: 'ETIMEDOUT',
      message: `ublk SET_PARAMS of device 3 did not finish within ${COMMAND_BOUND_MS / 1000} s: the kernel's ublk driver did not answer`,
    });
    await vi.advanceTimersByTimeAsync(COMMAND_BOUND_MS);
    await settled;
    expect(pending).toEqual([encodeControlOp(CMD.SET_PARAMS, true)]);
  });

  test('a command that waits for I/O is left to its caller\'s bound', async () => {
    vi.useFakeTimers();
    silent.add(encodeControlOp(CMD.STOP_DEV, true));
    const control = UblkControl.open();
    let settled = false;
    void control.stop(3).finally(() => (settled = true));
    await vi.advanceTimersByTimeAsync(COMMAND_BOUND_MS * 4);
    expect(settled).toBe(false);
    expect(pending).toEqual([encodeControlOp(CMD.STOP_DEV, true)]);
  });
});
