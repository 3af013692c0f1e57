/**
 * Command lines cldd and clddsetup cannot understand: one line on stderr ending with [EINVAL],
 * exit status 2, whoever detects the mistake (yargs, an option's parser, clddsetup).
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { parseSize } from '../src/cli/options.js';
import { type Cli, type CliResult, buildCli } from './support/cli.js';

let cli: Cli;

beforeAll(async () => {
  cli = await buildCli();
});

afterAll(async () => {
  await cli.remove();
});

const env = { CLDD_UBLK_CONTROL: '/dev/null', CLDD_RUN_DIR: '/nonexistent/cldd-usage-test' };

const clddsetup = (args: string[]) => cli.run(args, { env, program: 'clddsetup' });

const usageError = (r: CliResult, program: string, what: string) => {
  expect(r.stderr, what).toMatch(new RegExp(`^${program}: [^\\n]+ \\[EINVAL\\]\\n$`));
  expect(r.stdout, what).toBe('');
  expect(r.code, what).toBe(2);
};

describe('usage errors: one line ending with [EINVAL], exit status 2', () => {
  test.each([
    [['add', 'x.img', '--size']],
    [['add', 'x.img', '--size', '1G', '--name']],
    [['add', 'x.img', '--size', '1G', '--bogus']],
    [['add', 'x.img', '--size', '5iB']],
    [['add', 'x.img', '--size', '1.5']],
    [['add', 'x.img', '--size', '1G', '--queues', 'abc']],
    [['add', 'x.img', '--size', '1G', '--name', 'Bad Name']],
    [['add']],
    [[]],
    [['bogus']],
    [['check', '']],
    [['check']],
    [['enable', 'p1', '--freeze', '']],
    [['backup', 'p1', '/tmp/t.img', '--rate', 'fast']],
    [['backup', 'p1', '/tmp/t.img', '--rate', '0']],
  ])('cldd %j', async (args) => {
    usageError(await cli.run(args, { env }), 'cldd', args.join(' '));
  });

  test('the messages say what is wrong', async () => {
    expect((await cli.run(['add', 'x.img', '--size'], { env })).stderr).toBe('cldd: Not enough arguments following: size [EINVAL]\n');
    expect((await cli.run(['add', 'x.img', '--size', '1G', '--bogus'], { env })).stderr).toBe('cldd: Unknown argument: bogus [EINVAL]\n');
    expect((await cli.run(['check', ''], { env })).stderr).toBe('cldd: the backing store is empty [EINVAL]\n');
  });

  test.each([[[]], [['-e']], [['-x', 'foo']], [['-m', '/dev/sda', 'x.img']], [['/dev/cldm0', 'extra']]])('clddsetup %j', async (args) => {
    usageError(await clddsetup(args), 'clddsetup', args.join(' '));
  });
});

test('a size is digits with an optional unit: "iB" needs a unit letter, and bytes are whole', () => {
  expect(parseSize('--size', '4096')).toBe(4096);
  expect(parseSize('--size', '4096B')).toBe(4096);
  expect(parseSize('--size', '5K')).toBe(5 << 10);
  expect(parseSize('--size', '5KiB')).toBe(5 << 10);
  expect(parseSize('--size', '5kb')).toBe(5 << 10);
  expect(parseSize('--size', '1.5G')).toBe(1.5 * 2 ** 30);
  for (const bad of ['5iB', '5ib', '5i', '1.5', '1.5B', 'G', '5X', '']) {
    expect(() => parseSize('--size', bad), bad).toThrow(expect.objectContaining({ code: 'EINVAL' }));
  }
});
