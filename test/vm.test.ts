/**
 * The VM harness (scripts/vm/run.sh): a command runs in a throwaway qemu VM with ublk_drv loaded
 * and the host's / visible read-only under a throwaway overlay, and its exit code and output come
 * back unchanged. Two boots in all (TCG is slow), at the same time, which also shows that two
 * runs do not collide: one runs every in-VM check and exits 0, one exits 7. The timeout and
 * argument checks boot nothing worth waiting for.
 *
 * If the VM cannot start, these tests fail with the harness's "vm: " line: nothing is skipped.
 */
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { beforeAll, describe, expect, test } from 'vitest';

const RUN = fileURLToPath(new URL('../scripts/vm/run.sh', import.meta.url));
const PREPARE = fileURLToPath(new URL('../scripts/vm/prepare.sh', import.meta.url));
const HARNESS_FAILURE = 125;

interface Result {
  code: number | null;
  stdout: string;
  stderr: string;
}

function run(cmd: string, args: string[], env: NodeJS.ProcessEnv = process.env): Promise<Result> {
  return new Promise((resolve) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], env });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => (stderr += d));
    child.on('close', (code) => resolve({ code, stdout, stderr }));
    child.on('error', (err) => resolve({ code: null, stdout, stderr: `${stderr}${String(err)}\n` }));
  });
}

/**
 * The harness's own bound on a VM, below the tests' 600 s: a VM that hangs ends with run.sh's
 * "vm: timed out" line and its qemu gone, before vitest gives up on the test.
 */
const VM_BOUND_S = 540;

/** Runs CMD in a VM; a failure of the harness itself fails the test with the harness's reason. */
async function inVm(args: string[], env?: NodeJS.ProcessEnv): Promise<Result> {
  const result = await run(RUN, ['--timeout', String(VM_BOUND_S), '--', ...args], env);
  const reason = result.stderr.split('\n').find((line) => line.startsWith('vm: '));
  if (result.code === HARNESS_FAILURE && reason) throw new Error(`the VM harness failed: ${reason}`);
  if (result.code === null) throw new Error(`scripts/vm/run.sh did not run: ${result.stderr}`);
  // A boot that panicked before the command started is retried once, with a note (run.sh).
  const stderr = result.stderr.replace(/^vm: note: the guest kernel panicked while booting.*\n/m, '');
  return { ...result, stderr };
}

describe('scripts/vm/run.sh', () => {
  // Builds the kernel and initramfs on the first run (download included), so the tests' own
  // timeouts cover boots only.
  beforeAll(async () => {
    const result = await run(PREPARE, []);
    if (result.code !== 0) {
      const reason = result.stderr.split('\n').find((line) => line.startsWith('vm: '));
      throw new Error(`preparing the VM failed: ${reason ?? result.stderr}`);
    }
  }, 900_000);

  test.concurrent('runs the command as root in the caller\'s directory, with ublk, node, the caller\'s environment and arguments, a throwaway overlay, and exit code 0', async () => {
    const probe = `.vm-test-${process.pid}-${Date.now()}`;
    const tricky = `it's a "test" with $HOME, \`backticks\`, \\ and\na newline`;
    const script = [
      'echo "uid=$(id -u)"',
      'echo "cwd=$(pwd)"',
      'echo "kernel=$(uname -r)"',
      'test -c /dev/ublk-control && echo "ublk-control=yes"',
      'node -e "console.log(\'node=\' + 6 * 7)"',
      'printf "arg=[%s]\\n" "$1"',
      'echo "env=$CLDD_VM_TEST_VALUE"',
      'echo "ci=${CI-unset}"',
      // Written in the working directory, i.e. in the repository on the host's /: it must stay
      // in the VM's overlay.
      `echo overlay > ${probe} && echo "probe=$(cat ${probe})"`,
      'mount | grep -q " /tmp type tmpfs" && echo "tmp=tmpfs"',
      'echo to-stderr >&2',
    ].join('\n');
    const env = { ...process.env, CLDD_VM_TEST_VALUE: 'a b  c', CI: 'yes', NOT_PASSED: 'x' };
    const result = await inVm(['sh', '-c', script, 'sh', tricky], env);

    expect(result.code, result.stderr).toBe(0);
    const lines = result.stdout.split('\n');
    expect(lines).toContain('uid=0');
    expect(lines).toContain(`cwd=${process.cwd()}`);
    expect(lines.find((l) => l.startsWith('kernel='))).toMatch(/^kernel=6\.12\./);
    expect(lines).toContain('ublk-control=yes');
    expect(lines).toContain('node=42');
    expect(result.stdout).toContain(`arg=[${tricky}]\n`);
    expect(lines).toContain('env=a b  c');
    expect(lines).toContain('ci=yes');
    expect(lines).toContain('probe=overlay');
    // /tmp is a fresh tmpfs, except when the caller works under /tmp (then it is the host's, overlaid).
    const underTmp = process.cwd() === '/tmp' || process.cwd().startsWith('/tmp/');
    expect(lines.includes('tmp=tmpfs')).toBe(!underTmp);
    expect(existsSync(join(process.cwd(), probe)), 'a file written in the VM leaked to the host').toBe(false);
    // Only the command's output: no boot log, no harness chatter.
    expect(result.stdout.replace(/^kernel=.*$/m, 'kernel=*')).toBe(
      ['uid=0', `cwd=${process.cwd()}`, 'kernel=*', 'ublk-control=yes', 'node=42', `arg=[${tricky}]`,
        'env=a b  c', 'ci=yes', 'probe=overlay', ...(underTmp ? [] : ['tmp=tmpfs']), ''].join('\n'),
    );
    expect(result.stderr).toBe('to-stderr\n');
  }, 600_000);

  test.concurrent('passes a non-zero exit code back, with the output written before it', async () => {
    const result = await inVm(['sh', '-c', 'echo before-exit; echo err-before-exit >&2; exit 7']);
    expect(result.code, result.stderr).toBe(7);
    expect(result.stdout).toBe('before-exit\n');
    expect(result.stderr).toBe('err-before-exit\n');
  }, 600_000);

  test('a command that outlives --timeout ends the VM with exit 125 and a "vm: " line', async () => {
    const result = await run(RUN, ['--timeout', '2', '--', 'sleep', '600']);
    expect(result.code).toBe(HARNESS_FAILURE);
    expect(result.stderr).toMatch(/^vm: timed out after 2 s/m);
  }, 120_000);

  test('bad options end with exit 125 and a "vm: " line, without booting', async () => {
    const result = await run(RUN, ['--mem', 'lots', '--', 'true']);
    expect(result.code).toBe(HARNESS_FAILURE);
    expect(result.stderr).toMatch(/^vm: .*positive integers/m);
  }, 60_000);
});
