/**
 * Device benchmark: runs scripts/bench/device-inside.sh where the kernel has ublk (natively, or
 * in the test VM) and writes the cldd/loop ratios to docs/benchmarks.md. Only ratios from one run
 * count: software emulation inflates user-space cost.
 */
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { writeSection } from './report.js';

interface Row {
  job: string;
  device: 'cldd' | 'loop';
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

async function main(): Promise<void> {
  const native = existsSync('/dev/ublk-control') && process.getuid?.() === 0;
  const script = 'scripts/bench/device-inside.sh';
  const [cmd, args] = native ? ['bash', [script]] : ['bash', ['scripts/vm/run.sh', '--timeout', '3000', '--mem', '6144', '--', 'bash', script]];
  // A 2 GiB RAM disk in the VM for the backing files (device-inside.sh puts ext4 on it).
  // Without ERMS the guest kernel copies to and from user memory with rep movsq instead of
  // rep movsb, which qemu's TCG emulates a byte at a time: that one copy took 70% of the
  // server's time on 1 MiB reads, a cost no real CPU has (loop's copies are kernel memcpy).
  const env = native
    ? process.env
    : {
        ...process.env,
        CLDD_VM_MODULES: `${process.env.CLDD_VM_MODULES ?? ''} brd:rd_nr=1,rd_size=${2 << 20}`.trim(),
        CLDD_VM_CPU: process.env.CLDD_VM_CPU ?? 'max,-erms',
      };
  const { code, stdout } = await new Promise<{ code: number | null; stdout: string }>((resolve) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'inherit'], env });
    let out = '';
    child.stdout.on('data', (d) => (out += d));
    child.on('close', (c) => resolve({ code: c, stdout: out }));
  });
  if (code !== 0) throw new Error(`${script} failed (exit ${code})`);
  const records = stdout.split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l) as Row & { fs?: string });
  const fs = records.find((l) => l.fs)?.fs ?? 'unknown';
  const rows = records.filter((l) => !l.fs);
  const jobs = [...new Set(rows.map((r) => r.job))];
  const lines = ['| fio job | cldd | loop | ratio | target | |', '|---|---:|---:|---:|---:|---|'];
  for (const job of jobs) {
    const c = rows.find((r) => r.job === job && r.device === 'cldd')!;
    const l = rows.find((r) => r.job === job && r.device === 'loop')!;
    const seq = job.includes('1m');
    const fmt = (r: Row) => (seq ? `${(r.bw / 1048576).toFixed(1)} MiB/s` : `${Math.round(r.iops)} IOPS, ${r.lat_us.toFixed(0)} µs`);
    const ratio = seq ? c.bw / l.bw : c.iops / l.iops;
    const target = TARGETS[job];
    lines.push(`| ${job} | ${fmt(c)} | ${fmt(l)} | ${ratio.toFixed(2)}x | ${target}x | ${ratio >= target ? 'met' : 'missed'} |`);
  }
  const where = native ? 'natively on this host' : `in the test VM (qemu TCG, -cpu ${env.CLDD_VM_CPU}, Debian 6.12 kernel, 2 vCPUs)`;
  const text = [
    `Measured ${new Date().toISOString().slice(0, 10)} ${where}: fio (io_uring, O_DIRECT, ${process.env.CLDD_BENCH_RUNTIME ?? 15} s per job) on the cldd master and on a kernel loop device over an identical backing file on the same file system (${fs}), one after the other in the same run.`,
    'Software emulation inflates user-space cost, so only the ratios mean anything.',
    '',
    ...lines,
  ].join('\n');
  console.log(text);
  await writeSection('device', 'Devices: cldd master versus a loop device', text);
}

main().catch((err) => {
  console.error(`bench: ${err instanceof Error ? err.message : String(err)}`);
  process.exit(1);
});
