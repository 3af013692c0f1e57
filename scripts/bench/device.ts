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
  round: number;
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

function median(values: number[]): number {
  const v = [...values].sort((a, b) => a - b);
  const mid = v.length >> 1;
  return v.length % 2 ? v[mid] : (v[mid - 1] + v[mid]) / 2;
}

/**
 * One line per job. A device's figure is its median over the rounds; a ratio is the median of
 * the rounds' own ratios (each cldd figure against loop's in the same round, measured minutes
 * apart at most), with their range beside it.
 */
function table(rows: Row[]): string[] {
  const jobs = [...new Set(rows.map((r) => r.job))];
  const copy = rows.some((r) => r.device === 'cldd-copy');
  const rounds = new Set(rows.map((r) => r.round)).size;
  const head = `| fio job | cldd | loop | ratio | ${rounds} rounds | target | |`;
  const lines = copy
    ? [`${head} cldd --no-zero-copy | ratio | ${rounds} rounds |`, '|---|---:|---:|---:|---:|---:|---|---:|---:|---:|']
    : [head, '|---|---:|---:|---:|---:|---:|---|'];
  for (const job of jobs) {
    const seq = job.includes('1m');
    const value = (r: Row) => (seq ? r.bw : r.iops);
    const of = (device: Row['device']) => rows.filter((r) => r.job === job && r.device === device);
    const loop = of('loop');
    const fmt = (device: Row['device']) => {
      const rs = of(device);
      if (seq) return `${(median(rs.map((r) => r.bw)) / 1048576).toFixed(1)} MiB/s`;
      return `${Math.round(median(rs.map((r) => r.iops)))} IOPS, ${median(rs.map((r) => r.lat_us)).toFixed(0)} µs`;
    };
    const ratios = (device: Row['device']) =>
      of(device).flatMap((r) => {
        const l = loop.find((x) => x.round === r.round);
        return l ? [value(r) / value(l)] : [];
      });
    const summary = (device: Row['device']): [number, string] => {
      const rs = ratios(device);
      return [median(rs), `${Math.min(...rs).toFixed(2)}-${Math.max(...rs).toFixed(2)}`];
    };
    const [ratio, range] = summary('cldd');
    const target = TARGETS[job];
    let line = `| ${job} | ${fmt('cldd')} | ${fmt('loop')} | ${ratio.toFixed(2)}x | ${range} | ${target}x | ${ratio >= target ? 'met' : 'missed'} |`;
    if (copy) {
      const [copyRatio, copyRange] = summary('cldd-copy');
      line += ` ${fmt('cldd-copy')} | ${copyRatio.toFixed(2)}x | ${copyRange} |`;
    }
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
  const seconds = process.env.CLDD_BENCH_RUNTIME ?? 10;
  const text: string[] = [
    `Measured ${new Date().toISOString().slice(0, 10)}: fio (io_uring, O_DIRECT, ${seconds} s per job) on the cldd master and on a kernel loop device over an identical backing file on the same file system, each job on every device in turn in the same machine, in ${process.env.CLDD_BENCH_ROUNDS ?? 3} rounds.`,
    "Figures are medians over the rounds; a ratio is the median of each round's ratio to loop, with their range beside it.",
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
