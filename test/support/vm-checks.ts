/**
 * Runs a script of real-device checks where the kernel has ublk: natively when this host has
 * /dev/ublk-control (as root), else inside one throwaway VM (scripts/vm/run.sh). The script
 * prints "CHECK <name> PASS" or "CHECK <name> FAIL <reason>" per check and "CHECKS DONE" at
 * the end; each check becomes a test. If the VM cannot start, every test fails with the
 * harness's reason: nothing is skipped.
 */
import { spawn } from 'node:child_process';
import { existsSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { beforeAll, expect, test } from 'vitest';

export interface CheckResult {
  pass: boolean;
  reason: string;
}

/**
 * `vmEnv` goes to the VM harness only (e.g. CLDD_VM_SUITE for another kernel); natively the
 * checks run on the host's kernel.
 */
export function deviceChecks(
  script: string,
  checks: Record<string, string>,
  logName: string,
  options: { timeoutSeconds?: number; vmEnv?: Record<string, string> } = {},
): void {
  const timeoutSeconds = options.timeoutSeconds ?? 1500;
  const log = join(tmpdir(), logName);
  const results = new Map<string, CheckResult>();
  let harnessFailure: string | null = null;

  beforeAll(async () => {
    if (!existsSync('build/Release/cldd_native.node')) {
      harnessFailure = 'build/Release/cldd_native.node is missing: run npm run setup (node-gyp) first';
      return;
    }
    if (!existsSync('dist/cli/index.js')) {
      harnessFailure = 'dist/ is missing: run npm run setup (tsc) first';
      return;
    }
    const native = existsSync('/dev/ublk-control') && process.getuid?.() === 0;
    const names = Object.keys(checks);
    const [cmd, args] = native
      ? ['bash', [script, ...names]]
      : ['bash', ['scripts/vm/run.sh', '--timeout', String(timeoutSeconds), '--', 'bash', script, ...names]];
    const env = native ? process.env : { ...process.env, ...options.vmEnv };
    const output = await new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve) => {
      const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], env });
      let stdout = '';
      let stderr = '';
      child.stdout.on('data', (d) => (stdout += d));
      child.stderr.on('data', (d) => (stderr += d));
      // The VM harness kills qemu at its own timeout; natively nothing would: the same bound
      // here, naming the check that was running.
      const killer = setTimeout(() => {
        const running = [...stderr.matchAll(/^(?:== |  --- )(\S+)/gm)].pop()?.[1] ?? 'none started';
        stderr += `\n[test] the checks did not finish within ${timeoutSeconds} s (running: ${running}); killed\n`;
        child.kill('SIGKILL');
      }, (timeoutSeconds + 60) * 1000);
      child.on('close', (code) => {
        clearTimeout(killer);
        resolve({ code, stdout, stderr });
      });
      child.on('error', (err) => resolve({ code: null, stdout, stderr: stderr + String(err) }));
    });
    writeFileSync(log, `$ ${cmd} ${args.join(' ')}\nexit ${output.code}\n--- stdout\n${output.stdout}\n--- stderr\n${output.stderr}`);
    for (const line of output.stdout.split('\n')) {
      const m = /^CHECK (\S+) (PASS|FAIL)\s*(.*)$/.exec(line.trim());
      if (m) results.set(m[1], { pass: m[2] === 'PASS', reason: m[3] });
    }
    if (!output.stdout.includes('CHECKS DONE')) {
      const vmLine = output.stderr.split('\n').find((l) => l.startsWith('vm: '));
      harnessFailure = vmLine ?? `the checks did not finish (exit ${output.code}); last output: ${output.stderr.slice(-400)}`;
    }
  }, (timeoutSeconds + 120) * 1000);

  for (const [name, what] of Object.entries(checks)) {
    test(`${name}: ${what}`, () => {
      const result = results.get(name);
      if (!result) throw new Error(`no result for check ${name}: ${harnessFailure ?? 'the script did not report it'} (see ${log})`);
      expect(result.pass, `${name}: ${result.reason} (see ${log})`).toBe(true);
    });
  }
}
