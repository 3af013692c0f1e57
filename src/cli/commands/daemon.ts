import { writeSync } from 'node:fs';
import { resolve } from 'node:path';
import type { Argv, CommandModule } from 'yargs';
import { type CldError, codeOf } from '../../errors.js';
import { DEFAULT_CONFIG, LIMITS, LOG_LEVELS, type LogLevel, type PairConfig, readConfig } from '../../protocol/config.js';
import { Daemon } from '../../daemon/daemon.js';
import { stderrLogger } from '../../daemon/logger.js';
import { checkName, configPath, defaultPaths } from '../../protocol/paths.js';
import type { ReadyLine } from '../../protocol/methods.js';
import { refuseUnattachable } from '../backing.js';
import { parseCount, parsePath } from '../options.js';
import { requireRoot } from '../root.js';

interface Args {
  name: string;
  backing?: string;
  queues: string;
  depth: string;
  'zero-copy': boolean;
  'poll-us': string;
  'log-level': LogLevel;
  'resync-rate': string;
  'ready-fd'?: number;
}

/**
 * The daemon of one pair, in the foreground: what systemd runs (cldd@NAME.service, reading
 * /etc/cldd/NAME.conf) and what `cldd add` starts detached (with --backing).
 */
export const daemonCommand: CommandModule<object, Args> = {
  command: 'daemon <name>',
  describe: false,
  builder: (y: Argv) =>
    y
      .positional('name', { type: 'string', demandOption: true })
      .option('backing', { type: 'string', nargs: 1, describe: 'backing store (default: from /etc/cldd/NAME.conf)' })
      .option('queues', { type: 'string', nargs: 1, default: String(DEFAULT_CONFIG.queues) })
      .option('depth', { type: 'string', nargs: 1, default: String(DEFAULT_CONFIG.depth) })
      .option('zero-copy', { type: 'boolean', default: DEFAULT_CONFIG.zeroCopy })
      .option('poll-us', { type: 'string', nargs: 1, default: String(DEFAULT_CONFIG.pollMicros) })
      .option('log-level', { choices: LOG_LEVELS, default: DEFAULT_CONFIG.logLevel })
      .option('resync-rate', { type: 'string', nargs: 1, default: '0', describe: 'resync rate limit, bytes per second' })
      .option('ready-fd', { type: 'number', describe: 'write one JSON line here when ready (or failed)' }) as unknown as Argv<Args>,
  handler: async (args) => {
    const report = (message: ReadyLine) => {
      if (args['ready-fd'] === undefined) return;
      try {
        writeSync(args['ready-fd'], `${JSON.stringify(message)}\n`);
      } catch {
        // the starter went away; the log still says it
      }
    };
    const name = checkName(args.name);
    const paths = defaultPaths();
    let daemon: Daemon;
    let config: PairConfig;
    try {
      requireRoot('cldd daemon');
      config =
        args.backing !== undefined
          ? {
              backing: resolve(parsePath('--backing', args.backing)),
              queues: parseCount('--queues', args.queues, LIMITS.queues),
              depth: parseCount('--depth', args.depth, LIMITS.depth),
              logLevel: args['log-level'],
              resyncRate: parseCount('--resync-rate', args['resync-rate'], LIMITS.resyncRate),
              zeroCopy: args['zero-copy'],
              pollMicros: parseCount('--poll-us', args['poll-us'], LIMITS.pollMicros),
            }
          : await readConfig(configPath(paths, name));
      await refuseUnattachable(config.backing);
      const log = stderrLogger(config.logLevel, name);
      const { ublkBackend } = await import('../../daemon/ublk-backend.js');
      daemon = await Daemon.start({ ...config, name }, await ublkBackend(log), log, paths);
    } catch (err) {
      const e = err as CldError;
      report({ error: { code: codeOf(err), message: e.message ?? String(err) } });
      throw err;
    }
    const info = daemon.devicesInfo;
    report({
      ready: {
        master: info?.master ?? null,
        slave: info?.slave ?? null,
        pid: process.pid,
        state: daemon.service.status().state,
        recovered: info?.recovered ?? false,
        layout: info?.layout ?? null,
      },
    });
    // A stop that fails rejects daemon.stopped, below, which exits non-zero.
    const stop = () => void daemon.stop().catch(() => {});
    process.on('SIGTERM', stop);
    process.on('SIGINT', stop);
    process.on('SIGHUP', () => {});
    await daemon.stopped;
  },
};
