/**
 * Device benchmark: runs scripts/bench/device-inside.sh where the kernel has ublk (natively, or
 * in the test VM) and writes the cldd/loop ratios to docs/benchmarks.md. In the VM it runs twice:
 * on the harness's 6.12 kernel, where every request is copied through the daemon, and on a
 * 6.16+ kernel (trixie-backports), where the master uses zero copy and a second pair without it
 * is measured beside it. Only ratios from one run count: software emulation inflates user-space
 * cost.
 */
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { writeSection } from './report.js';

interface Row {
  job: string;
  device: 'cldd' | 'cldd-copy' | 'loop';
  iops: number;
  bw: number;
  lat_us: number;
}

const TARGETS: Record<string, number> = {
  'randread-4k-qd1': 0.7,
  'randwrite-4k-qd1': 0.7,
  'randread-4k-qd32': 0.9,
  'randwrite-4k-qd32': 0.9,
  'read-1m-seq': 0.9,
  'write-1m-seq': 0.9,
};

interface Run {
  /** Debian suite of the VM's kernel; null natively. */
  suite: string | null;
  modes: string;
}

async function measure(run: Run): Promise<{ rows: Row[]; fs: string; zeroCopy: boolean; kernel: string }> {
  const script = 'scripts/bench/device-inside.sh';
  const [cmd, args] = run.suite
    ? ['bash', ['scripts/vm/run.sh', '--timeout', '3000', '--mem', '6144', '--', 'bash', '-c', `uname -r >&2 && exec bash ${script}`]]
    : ['bash', ['-c', `uname -r >&2 && exec bash ${script}`]];
  // A 2 GiB RAM disk in the VM for the backing files (device-inside.sh puts ext4 on it).
  // Without ERMS the guest kernel copies to and from user memory with rep movsq instead of
  // rep movsb, which qemu's TCG emulates a byte at a time: that one copy took 70% of the
  // server's time on 1 MiB reads, a cost no real CPU has (loop's copies are kernel memcpy).
  const env = {
    ...process.env,
    CLDD_BENCH_MODES: run.modes,
    ...(run.suite
      ? {
          CLDD_VM_SUITE: run.suite,
          CLDD_VM_MODULES: `${process.env.CLDD_VM_MODULES ?? ''} brd:rd_nr=1,rd_size=${2 << 20}`.trim(),
          CLDD_VM_CPU: process.env.CLDD_VM_CPU ?? 'max,-erms',
        }
      : {}),
  };
  const { code, stdout, stderr } = await new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], env });
    let out = '';
    let err = '';
    child.stdout.on('data', (d) => (out += d));
    child.stderr.on('data', (d) => {
      err += d;
      process.stderr.write(d);
    });
    child.on('close', (c) => resolve({ code: c, stdout: out, stderr: err }));
  });
  if (code !== 0) throw new Error(`${script}${run.suite ? ` in the ${run.suite} VM` : ''} failed (exit ${code})`);
  const records = stdout.split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l) as Row & { fs?: string; zeroCopy?: boolean });
  const kernel = /^\d+\.\d+\S*$/m.exec(stderr)?.[0] ?? 'unknown';
  return {
    rows: records.filter((r) => r.job),
    fs: records.find((r) => r.fs)?.fs ?? 'unknown',
    zeroCopy: records.some((r) => r.zeroCopy),
    kernel,
  };
}

function table(rows: Row[]): string[] {
  const jobs = [...new Set(rows.map((r) => r.job))];
  const copy = rows.some((r) => r.device === 'cldd-copy');
  const lines = copy
    ? ['| fio job | cldd | loop | ratio | target | | cldd --no-zero-copy | ratio |', '|---|---:|---:|---:|---:|---|---:|---:|']
    : ['| fio job | cldd | loop | ratio | target | |', '|---|---:|---:|---:|---:|---|'];
  for (const job of jobs) {
    const get = (device: Row['device']) => rows.find((r) => r.job === job && r.device === device)!;
    const seq = job.includes('1m');
    const fmt = (r: Row) => (seq ? `${(r.bw / 1048576).toFixed(1)} MiB/s` : `${Math.round(r.iops)} IOPS, ${r.lat_us.toFixed(0)} µs`);
    const ratio = (r: Row) => (seq ? r.bw / get('loop').bw : r.iops / get('loop').iops);
    const c = get('cldd');
    const target = TARGETS[job];
    let line = `| ${job} | ${fmt(c)} | ${fmt(get('loop'))} | ${ratio(c).toFixed(2)}x | ${target}x | ${ratio(c) >= target ? 'met' : 'missed'} |`;
    if (copy) line += ` ${fmt(get('cldd-copy'))} | ${ratio(get('cldd-copy')).toFixed(2)}x |`;
    lines.push(line);
  }
  return lines;
}

async function main(): Promise<void> {
  const native = existsSync('/dev/ublk-control') && process.getuid?.() === 0;
  const runs: Run[] = native
    ? [{ suite: null, modes: 'zero-copy no-zero-copy' }]
    : [
        { suite: 'bookworm-backports', modes: 'zero-copy' },
        { suite: 'trixie-backports', modes: 'zero-copy no-zero-copy' },
      ];
  const seconds = process.env.CLDD_BENCH_RUNTIME ?? 15;
  const text: string[] = [
    `Measured ${new Date().toISOString().slice(0, 10)}: fio (io_uring, O_DIRECT, ${seconds} s per job) on the cldd master and on a kernel loop device over an identical backing file on the same file system, each job on every device in turn in the same machine.`,
    'Software emulation inflates user-space cost, so only the ratios within one table mean anything.',
  ];
  for (const run of runs) {
    const r = await measure(run);
    const where = run.suite
      ? `In the test VM (qemu TCG, -cpu ${process.env.CLDD_VM_CPU ?? 'max,-erms'}, 2 vCPUs), Debian ${run.suite} kernel ${r.kernel}`
      : `Natively on this host, kernel ${r.kernel}`;
    const how = r.zeroCopy ? 'zero copy' : 'every request copied through the daemon (no zero copy in this kernel)';
    text.push('', `${where}; backing files on ${r.fs}; cldd with ${how}:`, '', ...table(r.rows));
  }
  console.log(text.join('\n'));
  await writeSection('device', 'Devices: cldd master versus a loop device', text.join('\n'));
}

main().catch((err) => {
  console.error(`bench: ${err instanceof Error ? err.message : String(err)}`);
  process.exit(1);
});
