import type { DaemonClient } from '../protocol/client.js';
import { CldError } from '../errors.js';
import { formatBytes } from './output.js';

function clock(seconds: number | null): string {
  if (seconds === null || !Number.isFinite(seconds)) return '--:--';
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const sec = String(s % 60).padStart(2, '0');
  return h ? `${h}:${String(m).padStart(2, '0')}:${sec}` : `${m}:${sec}`;
}

/**
 * How long a resync may go without merging a block before following it fails: a merge step is
 * at most 4 MiB and yields to the master for at most 20 ms at a time (src/engine/resync.ts), so
 * minutes without one mean it is stuck.
 */
export const RESYNC_STALL_MS = 300_000;

/**
 * Follows a resync until the pair is plain: a bar on a terminal, plain lines otherwise
 * (one every 5 percent or 10 seconds, whichever comes first). Fails when the resync fails, stops,
 * or merges nothing for stallMs.
 */
export async function followResync(client: DaemonClient, total: number, out: NodeJS.WriteStream = process.stdout, stallMs = RESYNC_STALL_MS): Promise<void> {
  const tty = out.isTTY === true;
  let lastLine = 0;
  let lastPercent = -100;
  let lastLeft = -1;
  let movedAt = Date.now();
  // The first report at once; then each reply waits in the daemon for the resync's end, so the
  // follower ends the moment it does rather than at its next poll.
  let waitMs = 0;
  let longPoll = true;
  for (;;) {
    const asked = Date.now();
    const p = await progressWithin(client, longPoll ? waitMs : 0).catch((err: unknown) => {
      // A daemon started before `waitMs` existed refuses it: poll it as before.
      if (!longPoll || !(err instanceof CldError) || err.code !== 'EINVAL') throw err;
      longPoll = false;
      return client.request('progress', { waitMs: undefined });
    });
    if (p.error) throw new CldError('EIO', `resync failed: ${p.error}`);
    const done = p.state === 'plain';
    if (!done && p.state !== 'resync') throw new CldError('CLDD_STATE', `the pair is in state ${p.state}, not resyncing`);
    if (!done && !p.running) throw new CldError('CLDD_STATE', `the resync is not running (${p.blocksLeft} blocks left); the daemon's log says why`);
    if (p.blocksLeft !== lastLeft) {
      lastLeft = p.blocksLeft;
      movedAt = Date.now();
    } else if (!done && Date.now() - movedAt > stallMs) {
      throw new CldError('ETIMEDOUT', `the resync merged nothing for ${stallMs / 1000} s (${p.blocksLeft} blocks left); cldd status shows the requests the devices hold`);
    }
    const left = done ? 0 : p.blocksLeft;
    const percent = total > 0 ? (100 * (total - left)) / total : 100;
    const detail = `${percent.toFixed(1)}%  ${formatBytes(p.rate)}/s  ${done ? 'done' : `${clock(p.secondsLeft)} left`}`;
    if (tty) {
      const width = 30;
      const filled = Math.round((width * percent) / 100);
      out.write(`\rresync [${'#'.repeat(filled)}${' '.repeat(width - filled)}] ${detail}   `);
      if (done) out.write('\n');
    } else if (done || percent - lastPercent >= 5 || Date.now() - lastLine >= 10_000) {
      out.write(`resync: ${detail} (${left} blocks left)\n`);
      lastLine = Date.now();
      lastPercent = percent;
    }
    if (done) return;
    const period = tty ? 250 : 1000;
    // Asked again at once after a reply the daemon held while the resync ran (a daemon that
    // answered sooner is asked when the wait would have ended); without the long poll, a
    // period after each reply.
    const pause = longPoll ? waitMs - (Date.now() - asked) : period;
    waitMs = period;
    if (pause > 0) await new Promise((r) => setTimeout(r, pause));
  }
}

const progressWithin = (client: DaemonClient, waitMs: number) => client.request('progress', { waitMs: waitMs > 0 ? waitMs : undefined });

/**
 * Reports a copy's progress: on a terminal a bar with bytes, rate and time left, redrawn at most
 * four times a second; otherwise one line every five seconds. `done()` ends the bar's line.
 */
export function copyProgress(label: string, out: NodeJS.WriteStream = process.stderr): { update: (done: number, total: number) => void; done: () => void } {
  const tty = out.isTTY === true;
  const started = performance.now();
  let last = 0;
  let drawn = false;
  const line = (done: number, total: number) => {
    const seconds = (performance.now() - started) / 1000;
    const rate = seconds > 0 ? done / seconds : 0;
    const left = rate > 0 ? (total - done) / rate : null;
    const percent = total > 0 ? (100 * done) / total : 100;
    return { percent, text: `${percent.toFixed(1)}%  ${formatBytes(done)} of ${formatBytes(total)}  ${formatBytes(rate)}/s  ${clock(left)} left` };
  };
  return {
    update(done, total) {
      const now = performance.now();
      if (now - last < (tty ? 250 : 5000) && done < total) return;
      last = now;
      const { percent, text } = line(done, total);
      if (tty) {
        const width = 30;
        const filled = Math.round((width * percent) / 100);
        out.write(`\r${label} [${'#'.repeat(filled)}${' '.repeat(width - filled)}] ${text}   `);
        drawn = true;
      } else if (done < total) {
        out.write(`${label}: ${text}\n`);
      }
    },
    done() {
      if (drawn) out.write('\n');
    },
  };
}
