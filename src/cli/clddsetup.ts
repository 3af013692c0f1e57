/**
 * clddsetup: the original tool's command line, mapped onto cldd's commands.
 *
 *   clddsetup -m /dev/cldmN BACKING   cldd add BACKING --name cldN   (short names /dev/cldmN, /dev/cldsN)
 *   clddsetup -e /dev/cldsN           cldd enable   (freezes the master's filesystem if mounted)
 *   clddsetup -d /dev/cldsN           cldd disable
 *   clddsetup DEVICE                  cldd status
 */
import { main as cldd } from './index.js';
import { printError, USAGE_EXIT, UsageError } from './output.js';

const USAGE = `usage: clddsetup -m /dev/cldmN BACKING | -e /dev/cldsN | -d /dev/cldsN | DEVICE
  -m MASTER BACKING   attach BACKING as the pair whose master is MASTER (/dev/cldmN)
  -e SLAVE            enable the slave: take the snapshot
  -d SLAVE            disable the slave: merge the changes back
  DEVICE              show the pair's status`;

/** The usage's first line, for errors: an error is one line. */
const SHORT_USAGE = USAGE.split('\n')[0];

export function translate(argv: string[]): string[] {
  const [flag, ...rest] = argv;
  const need = (n: number) => {
    if (rest.length !== n) throw new UsageError(`${flag} takes ${n === 1 ? 'one device' : 'a master device and a backing store'} (${SHORT_USAGE})`);
  };
  switch (flag) {
    case undefined:
      throw new UsageError(SHORT_USAGE);
    case '-h':
    case '--help':
      return ['--help-clddsetup'];
    case '-m': {
      need(2);
      const m = /^\/dev\/cldm(\d+)$/.exec(rest[0]);
      if (!m) throw new UsageError(`${rest[0]} is not a master device name (/dev/cldmN)`);
      return ['add', rest[1], '--name', `cld${m[1]}`];
    }
    case '-e':
      need(1);
      return ['enable', rest[0]];
    case '-d':
      need(1);
      return ['disable', rest[0]];
    default:
      if (flag.startsWith('-') || rest.length) throw new UsageError(`unknown arguments: ${argv.join(' ')} (${SHORT_USAGE})`);
      return ['status', flag];
  }
}

export async function main(argv: string[]): Promise<number> {
  let args: string[];
  try {
    args = translate(argv);
  } catch (err) {
    printError('clddsetup', err);
    return USAGE_EXIT;
  }
  if (args[0] === '--help-clddsetup') {
    console.log(USAGE);
    return 0;
  }
  return cldd(args);
}
