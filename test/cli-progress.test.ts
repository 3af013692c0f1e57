/**
 * Following a resync (cldd disable --wait, cldd enable --wait) ends: when the pair is plain,
 * and with an error when the resync fails, stops or merges nothing for too long.
 */
import { describe, expect, test } from 'vitest';
import { followResync } from '../src/cli/progress.js';
import { CldError } from '../src/errors.js';
import type { DaemonClient } from '../src/protocol/client.js';
import type { Result } from '../src/protocol/methods.js';

type Progress = Result<'progress'>;
const step = (state: string, blocksLeft: number, extra: Partial<Progress> = {}): Progress => ({
  state,
  running: state === 'resync',
  blocksLeft,
  blocksMerged: 0,
  rate: 0,
  secondsLeft: null,
  error: null,
  ...extra,
});

/**
 * A daemon whose progress replies are `steps`, the last one repeated. It holds a reply asked with
 * `waitMs` for 5 ms (standing in for the resync running on); one from before `waitMs` (`old`)
 * refuses it as the daemon refuses any unknown parameter.
 */
function daemon(steps: Progress[], old = false): { client: DaemonClient; asked: () => number; waits: (number | undefined)[] } {
  let n = 0;
  const waits: (number | undefined)[] = [];
  const request = async (_method: string, params: { waitMs?: number } = {}) => {
    waits.push(params.waitMs);
    if (params.waitMs !== undefined) {
      if (old) throw new CldError('EINVAL', 'progress: params has no member "waitMs"');
      await new Promise((r) => setTimeout(r, 5));
    }
    return steps[Math.min(n++, steps.length - 1)];
  };
  return { client: { request } as unknown as DaemonClient, asked: () => n, waits };
}

function sink(): NodeJS.WriteStream & { text: string } {
  const out = { isTTY: false, text: '', write: (s: string) => ((out.text += s), true) };
  return out as unknown as NodeJS.WriteStream & { text: string };
}

describe('following a resync', () => {
  test('ends when the pair is plain', async () => {
    const out = sink();
    await followResync(daemon([step('resync', 4), step('plain', 0)]).client, 4, out);
    expect(out.text).toMatch(/^resync: 0\.0% .*\(4 blocks left\)\nresync: 100\.0% .*done \(0 blocks left\)\n$/);
  });

  test('asks the daemon to hold each reply after the first until the resync ends', async () => {
    const d = daemon([step('resync', 4), step('resync', 2), step('plain', 0)]);
    const out = sink();
    await followResync(d.client, 4, out);
    expect(d.waits).toEqual([undefined, 1000, 1000]);
    expect(out.text).toMatch(/\(0 blocks left\)\n$/);
  });

  test('polls a daemon that does not know waitMs, as before', async () => {
    const d = daemon([step('resync', 4), step('resync', 2), step('plain', 0)], true);
    const out = sink();
    await followResync(d.client, 4, out);
    expect(d.waits).toEqual([undefined, 1000, undefined, undefined]);
    expect(out.text).toMatch(/\(0 blocks left\)\n$/);
  });

  test('fails at once when the resync failed or is not running', async () => {
    await expect(followResync(daemon([step('resync', 5, { running: false, error: 'read of 4096 bytes at 0: EIO' })]).client, 5, sink())).rejects.toMatchObject({
      code: 'EIO',
      message: 'resync failed: read of 4096 bytes at 0: EIO',
    });
    await expect(followResync(daemon([step('resync', 5, { running: false })]).client, 5, sink())).rejects.toMatchObject({
      code: 'CLDD_STATE',
      message: "the resync is not running (5 blocks left); the daemon's log says why",
    });
    await expect(followResync(daemon([step('snapshot', 0, { running: false })]).client, 5, sink())).rejects.toMatchObject({
      code: 'CLDD_STATE',
      message: 'the pair is in state snapshot, not resyncing',
    });
  });

  test('fails when the resync merges nothing for stallMs', async () => {
    const d = daemon([step('resync', 7)]);
    await expect(followResync(d.client, 7, sink(), 1)).rejects.toMatchObject({
      code: 'ETIMEDOUT',
      message: 'the resync merged nothing for 0.001 s (7 blocks left); cldd status shows the requests the devices hold',
    });
    // The first answer sets the mark; the second, a poll later, finds it unchanged.
    expect(d.asked()).toBe(2);
  });
});
