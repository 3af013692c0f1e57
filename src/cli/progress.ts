import type { DaemonClient } from '../daemon/client.js';
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
 * Follows a resync until the pair is plain: a bar on a terminal, plain lines otherwise
 * (one every 5 percent or 10 seconds, whichever comes first).
 */
export async function followResync(client: DaemonClient, total: number, out: NodeJS.WriteStream = process.stdout): Promise<void> {
  const tty = out.isTTY === true;
  let lastLine = 0;
  let lastPercent = -100;
  for (;;) {
    const p = await client.request('progress');
    if (p.error) throw new CldError('EIO', `resync failed: ${p.error}`);
    const done = p.state === 'plain';
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
    await new Promise((r) => setTimeout(r, tty ? 250 : 1000));
  }
}
