import { readFile } from 'node:fs/promises';
import { isAbsolute } from 'node:path';
import { CldError } from '../errors.js';

/**
 * A pair's configuration, /etc/cldd/NAME.conf: KEY=value lines (also a valid systemd
 * EnvironmentFile), '#' comments. BACKING is required; the others have defaults.
 *
 *   BACKING=/dev/disk/by-id/...   backing file or block device (absolute path)
 *   QUEUES=1                      ublk queues
 *   DEPTH=128                     queue depth
 *   LOG_LEVEL=info                error, warn, info or debug
 *   RESYNC_RATE=0                 resync rate limit in bytes per second, 0 for none
 *   ZERO_COPY=yes                 serve requests in place where the kernel can (yes or no)
 *   POLL_US=100                   how long a queue thread polls for the next request before it
 *                                 sleeps, µs; 0: never (docs/serving.md, "The queue thread's wait")
 */
export interface PairConfig {
  backing: string;
  queues: number;
  depth: number;
  logLevel: LogLevel;
  resyncRate: number;
  zeroCopy: boolean;
  pollMicros: number;
}

export type LogLevel = 'error' | 'warn' | 'info' | 'debug';
export const LOG_LEVELS: readonly LogLevel[] = ['error', 'warn', 'info', 'debug'];

/**
 * pollMicros: in the test VM (TCG) a 100 µs poll caught a sync reader's or writer's next request
 * and made 4 KiB random reads at QD1 1.75-2.05x as fast and writes 1.59-2.88x; a 30 µs one
 * caught too few (native/device.cc, Poll; docs/benchmarks.md). On hardware the next request
 * comes sooner, and a poll ends as soon as it does.
 */
export const DEFAULT_CONFIG: Omit<PairConfig, 'backing'> = { queues: 1, depth: 128, logLevel: 'info', resyncRate: 0, zeroCopy: true, pollMicros: 100 };

/** The allowed ranges, the same in a configuration file and on the command line. */
export const LIMITS = {
  queues: { min: 1, max: 64 },
  /** ublk's maximum queue depth. */
  depth: { min: 1, max: 4096 },
  resyncRate: { min: 0, max: Number.MAX_SAFE_INTEGER },
  /** The addon clamps to the same (native/wire.h, kMaxPollMicros; test/wire.test.ts). */
  pollMicros: { min: 0, max: 10_000 },
} as const;

export function parseConfig(text: string, source: string): PairConfig {
  const values = new Map<string, string>();
  text.split('\n').forEach((raw, i) => {
    const line = raw.trim();
    if (!line || line.startsWith('#')) return;
    const eq = line.indexOf('=');
    if (eq <= 0) throw new CldError('EINVAL', `${source}:${i + 1}: expected KEY=value`);
    const key = line.slice(0, eq).trim();
    let value = line.slice(eq + 1).trim();
    if (/^".*"$/.test(value)) value = value.slice(1, -1);
    if (!['BACKING', 'QUEUES', 'DEPTH', 'LOG_LEVEL', 'RESYNC_RATE', 'ZERO_COPY', 'POLL_US'].includes(key)) {
      throw new CldError('EINVAL', `${source}:${i + 1}: unknown key ${key}`);
    }
    values.set(key, value);
  });
  const backing = values.get('BACKING');
  if (!backing || !isAbsolute(backing)) throw new CldError('EINVAL', `${source}: BACKING must be an absolute path`);
  const int = (key: string, fallback: number, min: number, max: number) => {
    const v = values.get(key);
    if (v === undefined) return fallback;
    // Decimal digits only: Number() would also take 0x10, 1e2 and " 8 ".
    const n = /^\d{1,16}$/.test(v) ? Number(v) : NaN;
    if (!(n >= min && n <= max)) throw new CldError('EINVAL', `${source}: ${key}=${v} is not a whole number from ${min} to ${max}`);
    return n;
  };
  const logLevel = (values.get('LOG_LEVEL') ?? DEFAULT_CONFIG.logLevel) as LogLevel;
  if (!LOG_LEVELS.includes(logLevel)) throw new CldError('EINVAL', `${source}: LOG_LEVEL must be one of ${LOG_LEVELS.join(', ')}`);
  const zeroCopy = values.get('ZERO_COPY') ?? (DEFAULT_CONFIG.zeroCopy ? 'yes' : 'no');
  if (zeroCopy !== 'yes' && zeroCopy !== 'no') throw new CldError('EINVAL', `${source}: ZERO_COPY must be yes or no`);
  return {
    backing,
    queues: int('QUEUES', DEFAULT_CONFIG.queues, LIMITS.queues.min, LIMITS.queues.max),
    depth: int('DEPTH', DEFAULT_CONFIG.depth, LIMITS.depth.min, LIMITS.depth.max),
    logLevel,
    resyncRate: int('RESYNC_RATE', DEFAULT_CONFIG.resyncRate, LIMITS.resyncRate.min, LIMITS.resyncRate.max),
    zeroCopy: zeroCopy === 'yes',
    pollMicros: int('POLL_US', DEFAULT_CONFIG.pollMicros, LIMITS.pollMicros.min, LIMITS.pollMicros.max),
  };
}

export function formatConfig(config: PairConfig): string {
  return [
    '# cldd pair configuration, written by cldd add --persist',
    `BACKING=${config.backing}`,
    `QUEUES=${config.queues}`,
    `DEPTH=${config.depth}`,
    `LOG_LEVEL=${config.logLevel}`,
    `RESYNC_RATE=${config.resyncRate}`,
    `ZERO_COPY=${config.zeroCopy ? 'yes' : 'no'}`,
    `POLL_US=${config.pollMicros}`,
    '',
  ].join('\n');
}

export async function readConfig(path: string): Promise<PairConfig> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    if ((err as { code?: string }).code === 'ENOENT') throw new CldError('ENOENT', `${path} does not exist`);
    throw err;
  }
  return parseConfig(text, path);
}
