/**
 * Real ublk devices. The checks (test/fixtures/ublk-vm-checks.sh) run as root where the kernel
 * has ublk: natively when this host has /dev/ublk-control, else inside one throwaway VM booted by
 * scripts/vm/run.sh (one boot for all of them; TCG is slow, so the data sizes are modest). Each
 * check reports one line; each becomes a test here. If the VM cannot start, every test fails with
 * the harness's reason: nothing is skipped.
 *
 * Full output: $TMPDIR/cldd-ublk-vm.log.
 */
import { execFile, spawn } from 'node:child_process';
import { existsSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { beforeAll, describe, expect, test } from 'vitest';

const CHECKS = {
  filesystem: 'mkfs.ext4 on the master, files written and read back, e2fsck clean, stop + delete, re-add finds the files',
  slave: 'the slave shows the enable-time image while the master takes writes; read-only; busy slave refuses disable; resync',
  fio: 'fio --verify=crc32c on the raw master, mixed sizes, iodepth 32, two queues',
  recovery: 'SIGKILL during fio on a mounted master, --recover: the device stays, fio verifies, e2fsck clean',
  bad_input: 'missing, too small, foreign and already attached backing files are refused',
} as const;

const LOG = join(tmpdir(), 'cldd-ublk-vm.log');
const results = new Map<string, { pass: boolean; reason: string }>();
let harnessFailure: string | null = null;

async function runChecks(): Promise<void> {
  // The VM runs the built code: compile the TypeScript so it is current. The addon is built by
  // scripts/setup.sh (node-gyp); without it nothing can run.
  if (!existsSync('build/Release/cldd_native.node')) {
    harnessFailure = 'build/Release/cldd_native.node is missing: run npm run setup (node-gyp) first';
    return;
  }
  // Only the serving process's import graph, so work in progress elsewhere cannot stop this.
  const tsc = ['tsc', '--module', 'nodenext', '--moduleResolution', 'nodenext', '--target', 'es2022', '--strict', '--skipLibCheck',
    '--types', 'node', '--rootDir', 'src', '--outDir', 'dist', 'src/ublk/serve-main.ts'];
  try {
    await promisify(execFile)('npx', tsc);
  } catch (err) {
    harnessFailure = `compiling src/ublk/serve-main.ts failed: ${(err as { stdout?: string }).stdout ?? String(err)}`;
    return;
  }
  const native = existsSync('/dev/ublk-control') && process.getuid?.() === 0;
  const script = 'test/fixtures/ublk-vm-checks.sh';
  const [cmd, args] = native ? ['sh', [script]] : ['bash', ['scripts/vm/run.sh', '--timeout', '1200', '--', 'sh', script]];
  const output = await new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => (stderr += d));
    child.on('close', (code) => resolve({ code, stdout, stderr }));
    child.on('error', (err) => resolve({ code: null, stdout, stderr: stderr + String(err) }));
  });
  writeFileSync(LOG, `$ ${cmd} ${args.join(' ')}\nexit ${output.code}\n--- stdout\n${output.stdout}\n--- stderr\n${output.stderr}`);
  for (const line of output.stdout.split('\n')) {
    const m = /^CHECK (\S+) (PASS|FAIL)\s*(.*)$/.exec(line.trim());
    if (m) results.set(m[1], { pass: m[2] === 'PASS', reason: m[3] });
  }
  if (!output.stdout.includes('CHECKS DONE')) {
    const vmLine = output.stderr.split('\n').find((l) => l.startsWith('vm: '));
    harnessFailure = vmLine ?? `the checks did not finish (exit ${output.code}); last output: ${output.stderr.slice(-400)}`;
  }
}

describe('ublk devices in the kernel', () => {
  beforeAll(runChecks, 1_500_000);

  for (const [name, what] of Object.entries(CHECKS)) {
    test(`${name}: ${what}`, () => {
      const result = results.get(name);
      if (!result) throw new Error(`no result for check ${name}: ${harnessFailure ?? 'the script did not report it'} (see ${LOG})`);
      expect(result.pass, `${name}: ${result.reason} (see ${LOG})`).toBe(true);
    });
  }
});
