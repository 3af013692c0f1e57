import { access, rm } from 'node:fs/promises';
import { resolve } from 'node:path';
import { CldError } from '../../errors.js';
import type { Argv, CommandModule } from 'yargs';
import { computeLayout } from '../../format/format.js';
import { DEFAULT_CONFIG, LIMITS, type PairConfig } from '../../protocol/config.js';
import { refuseIfAttached, refuseIfRecoverable, refuseIfRunning } from '../../daemon/daemon.js';
import { checkName, defaultPaths } from '../../protocol/paths.js';
import { persist } from '../persist.js';
import { nameFromBacking, prepareBacking } from '../backing.js';
import { text } from '../../printable.js';
import { DEFAULT_BLOCK_SIZE, MAX_DEVICE_BLOCK_SIZE, parseBlockSize, parseCount, parseName, parsePath, parseSize } from '../options.js';
import { formatBytes, printJson } from '../output.js';
import { requireRoot } from '../root.js';
import { spawnDaemon } from '../spawn-daemon.js';

/** Options that take a value are strings here and parsed in the handler, with messages that quote them. */
interface Args {
  backing: string;
  name?: string;
  size?: string;
  'block-size'?: string;
  queues: string;
  depth: string;
  'zero-copy': boolean;
  'poll-us': string;
  force: boolean;
  persist: boolean;
  json: boolean;
}

export const addCommand: CommandModule<object, Args> = {
  command: 'add <backing>',
  describe: 'Make a backing file or partition a cldd pair (formatting it when new) and start its devices',
  builder: (y: Argv) =>
    y
      .positional('backing', { type: 'string', demandOption: true, describe: 'backing file or block device' })
      // nargs: 1 takes the next word as the value even when it starts with "-" (--size -5G is
      // then refused as a size, not parsed as the flags -5 and -G).
      .option('name', { type: 'string', nargs: 1, describe: 'pair name (default: from the backing file name)' })
      .option('size', { type: 'string', nargs: 1, describe: 'create the backing file with this size (e.g. 20G)' })
      .option('block-size', {
        type: 'string',
        nargs: 1,
        describe: `block size for a new store: ${DEFAULT_BLOCK_SIZE}, the page size (a block device's blocks are at most ${MAX_DEVICE_BLOCK_SIZE} bytes on x86-64)`,
      })
      .option('queues', { type: 'string', nargs: 1, default: String(DEFAULT_CONFIG.queues), describe: `ublk queues, ${LIMITS.queues.min} to ${LIMITS.queues.max}` })
      .option('depth', { type: 'string', nargs: 1, default: String(DEFAULT_CONFIG.depth), describe: `queue depth, ${LIMITS.depth.min} to ${LIMITS.depth.max}` })
      .option('zero-copy', {
        type: 'boolean',
        default: DEFAULT_CONFIG.zeroCopy,
        describe: 'serve requests in place where the kernel can (Linux 6.16+); --no-zero-copy copies them through the daemon',
      })
      .option('poll-us', {
        type: 'string',
        nargs: 1,
        default: String(DEFAULT_CONFIG.pollMicros),
        describe: `how long a queue thread polls for the next request before it sleeps, µs, ${LIMITS.pollMicros.min} (never) to ${LIMITS.pollMicros.max}: lower latency for a sync reader or writer, for CPU time while requests come`,
      })
      .option('force', { type: 'boolean', default: false, describe: 'format even over existing data, destroying it' })
      .option('persist', { type: 'boolean', default: false, describe: 'write /etc/cldd/NAME.conf and enable cldd@NAME at boot' })
      .option('json', { type: 'boolean', default: false }) as unknown as Argv<Args>,
  handler: async (args) => {
    // Every option is checked before anything is looked at, created or written.
    const backing = resolve(parsePath('the backing store', args.backing));
    const name = args.name === undefined ? checkName(nameFromBacking(backing)) : parseName('--name', args.name);
    const size = args.size === undefined ? undefined : parseSize('--size', args.size);
    const blockSize = args['block-size'] === undefined ? undefined : parseBlockSize('--block-size', args['block-size']);
    const queues = parseCount('--queues', args.queues, LIMITS.queues);
    const depth = parseCount('--depth', args.depth, LIMITS.depth);
    const pollMicros = parseCount('--poll-us', args['poll-us'], LIMITS.pollMicros);
    if (size !== undefined) computeLayout(size, blockSize ?? DEFAULT_BLOCK_SIZE); // too small for a store
    requireRoot('cldd add');
    const paths = defaultPaths();
    await requireUblkDriver();
    await refuseIfRunning(paths, name);
    await refuseIfAttached(paths, name, backing).catch((err) => {
      // A backing file that does not exist yet cannot be attached; prepareBacking explains.
      if (err.code !== 'ENOENT') throw err;
    });
    if (args.force) {
      await refuseIfRecoverable(paths, backing).catch((err) => {
        if (err.code !== 'ENOENT') throw err;
      });
    }
    const prepared = await prepareBacking(backing, { size, blockSize, name, force: args.force });
    const config: PairConfig = { ...DEFAULT_CONFIG, backing, queues, depth, zeroCopy: args['zero-copy'], pollMicros };
    let ready;
    try {
      ready = await spawnDaemon(paths, name, [
        '--backing',
        backing,
        '--queues',
        String(queues),
        '--depth',
        String(depth),
        args['zero-copy'] ? '--zero-copy' : '--no-zero-copy',
        '--poll-us',
        String(pollMicros),
      ]);
    } catch (err) {
      // A file this command created goes again; anything else keeps its (now cldd) contents.
      if (prepared.how === 'created') await rm(backing, { force: true });
      throw err;
    }
    const unit = args.persist ? await persist(paths, name, config) : null;
    const result = {
      name,
      backing,
      how: prepared.how,
      state: ready.state,
      capacity: prepared.capacity,
      master: ready.master,
      slave: ready.slave,
      links: { master: `/dev/cldd/${name}/master`, slave: `/dev/cldd/${name}/slave` },
      pid: ready.pid,
      recovered: ready.recovered,
      layout: ready.layout,
      unit,
    };
    // A recovered device keeps the layout it was created with, whatever this command asked for.
    const l = ready.layout;
    if (ready.recovered && l && (l.queues !== queues || l.depth !== depth || (l.zeroCopy && !args['zero-copy']))) {
      process.stderr.write(
        text`cldd: note: the live devices keep their layout (${l.queues} queue(s), depth ${l.depth}${l.zeroCopy ? ', zero copy' : ''}); ` +
          `--queues, --depth and --zero-copy apply when the devices are created again (cldd remove, then cldd add)\n`,
      );
    }
    if (args.json) return printJson(result);
    const what = ready.recovered
      ? 'took over the live devices of'
      : { created: 'created and formatted', formatted: 'formatted', existing: 'reattached' }[prepared.how];
    console.log(text`${name}: ${what} ${backing} (${formatBytes(prepared.capacity)} usable, state ${ready.state})`);
    console.log(text`master  ${ready.master}  (/dev/cldd/${name}/master)`);
    console.log(text`slave   ${ready.slave ?? `appears on enable as /dev/cldd/${name}/slave`}`);
    if (unit) console.log(text`enabled ${unit} for boot`);
  },
};

/** Checked before anything is written, so a machine without ublk changes nothing. */
async function requireUblkDriver(): Promise<void> {
  const control = process.env.CLDD_UBLK_CONTROL || '/dev/ublk-control';
  await access(control).catch(() => {
    throw new CldError('ENODEV', "the kernel's ublk driver is not loaded (modprobe ublk_drv; needs Linux 6.0+)");
  });
}
