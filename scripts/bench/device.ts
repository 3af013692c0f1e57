/**
 * Device benchmark: runs scripts/bench/device-inside.sh where the kernel has ublk (natively, or
 * in the test VM) and writes the cldd/loop ratios to docs/benchmarks.md, each against issue 12's
 * target: fio jobs against loop, first touch after enable against the same jobs before it (with
 * dm-snapshot's own ratio beside, and for a change area never written the loop device's into a
 * sparse file), resync against dd, and the daemon's memory. In the VM it runs
 * twice: on the harness's 6.12 kernel, where every request is copied through the daemon, and on a
 * 6.16+ kernel (trixie-backports), where the master uses zero copy and a second pair without it
 * is measured beside it. Only ratios from one run count: software emulation inflates user-space
 * cost.
 */
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync } from 'node:fs';
import { resolve } from 'node:path';
import { BlockMap } from '../../src/engine/block-map.js';
import { writeSection } from './report.js';

interface Row {
  round: number;
  job: string;
  device: 'cldd' | 'cldd-copy' | 'loop' | 'dm-snapshot' | 'ublksrv';
  /** First-touch jobs only: measured before or right after a snapshot was taken. */
  phase?: 'before' | 'after';
  iops: number;
  bw: number;
  lat_us: number;
}

/**
 * One round's resync of the first pair, and dd copying as many bytes on the same file system:
 * over blocks written before (dd_seconds, as the resync overwrites allocated blocks), and into a
 * new file (dd_new_seconds, which the file system's allocation adds to; absent in older logs).
 * runs: the resync's own runs (scripts/bench/resync-runs.mjs), and runs_copy: their copy by a
 * program that does nothing else (scripts/bench/copy-runs.c), over blocks written before (both
 * absent in older logs).
 */
interface Resync {
  round: number;
  resync: { blocks: number; bytes: number; seconds: number };
  dd_seconds: number;
  dd_new_seconds?: number;
  runs?: { runs: number; bytes: number };
  runs_copy?: { seconds: number };
}

interface Rss {
  rss: { device: Row['device']; rss_kib: number; hwm_kib: number; anon_kib?: number; file_kib?: number };
}

/**
 * Issue 12's targets: ratios to loop in one run, the same job after enable to before it, resync
 * to dd. The 1 MiB ones hold where the kernel has zero copy; on 6.12, which copies every request
 * through the daemon, the issue measured 0.57x and 0.55x and asks for no less.
 */
const TARGETS: Record<string, number> = {
  'randread-4k-qd1': 0.9,
  'randread-4k-qd32': 0.9,
  'randwrite-4k-qd1': 0.6,
  'randwrite-4k-qd32': 0.8,
  'randwrite-4k-qd1-fsync': 0.6,
  // Not a row of the issue's: its flush target, 0.6x loop, for what users' file systems send.
  'ext4-randwrite-4k-fsync': 0.6,
  'read-1m-seq': 0.9,
  'write-1m-seq': 0.9,
  'first-touch-randwrite-4k-qd32': 0.6,
  'first-touch-randwrite-4k-qd1-fsync': 0.3,
  'first-touch-written-area-randwrite-4k-qd32': 0.6,
  'first-touch-written-area-randwrite-4k-qd1-fsync': 0.3,
  // Not a row of the issue's either: ext4 with fsync in a fresh snapshot is first touches with
  // fsync through a file system, so it is held to the first-touch fsync row's target.
  'ext4-in-snapshot-randwrite-4k-fsync': 0.3,
  resync: 0.8,
};
const COPYING_TARGETS: Record<string, number> = { 'read-1m-seq': 0.57, 'write-1m-seq': 0.55 };
const RSS_LIMIT_MIB = 80;

interface Run {
  /** Debian suite of the VM's kernel; null natively. */
  suite: string | null;
  modes: string;
}

interface Measured {
  rows: Row[];
  resyncs: Resync[];
  rss: Rss['rss'][];
  fs: string;
  zeroCopy: boolean;
  kernel: string;
}

async function measure(run: Run, copyRuns: string): Promise<Measured> {
  const script = 'scripts/bench/device-inside.sh';
  const [cmd, args] = run.suite
    ? ['bash', ['scripts/vm/run.sh', '--timeout', '3000', '--mem', '10240', '--', 'bash', '-c', `uname -r >&2 && exec bash ${script}`]]
    : ['bash', ['-c', `uname -r >&2 && exec bash ${script}`]];
  // A 4 GiB RAM disk in the VM for the backing files (device-inside.sh puts ext4 on it): two
  // stores of 1 GiB (a 511 MiB master and its change area, which first touch fills), the loop
  // device's file, the C server's, dm-snapshot's exception store and dd's copy of the resync's
  // bytes. 3 GiB ran out (2026-11-30, 7.3, round 2) once the QD32 first-touch job got fast enough
  // to redirect most of the master in its 6 s: dd's copy of the resync's 400-511 MiB did not fit.
  // The VM's memory holds the RAM disk and the page cache over it.
  // Without ERMS the guest kernel copies to and from user memory with rep movsq instead of
  // rep movsb, which qemu's TCG emulates a byte at a time: that one copy took 70% of the
  // server's time on 1 MiB reads, a cost no real CPU has (loop's copies are kernel memcpy).
  const env = {
    ...process.env,
    CLDD_BENCH_MODES: run.modes,
    CLDD_BENCH_COPY_RUNS: copyRuns,
    ...(run.suite
      ? {
          CLDD_VM_SUITE: run.suite,
          // dm-snapshot is the first-touch comparison (scripts/vm/prepare.sh adds dm_mod and
          // dm_bufio, its dependencies).
          CLDD_VM_MODULES: `${process.env.CLDD_VM_MODULES ?? ''} brd:rd_nr=1,rd_size=${4 << 20} dm_snapshot`.trim(),
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
  const records = stdout
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => JSON.parse(l) as Partial<Row & Resync & Rss> & { fs?: string; zeroCopy?: boolean });
  const kernel = /^\d+\.\d+\S*$/m.exec(stderr)?.[0] ?? 'unknown';
  return {
    rows: records.filter((r): r is Row => r.job !== undefined),
    resyncs: records.filter((r): r is Resync => r.resync !== undefined),
    rss: records.flatMap((r) => (r.rss ? [r.rss] : [])),
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

const fmtIops = (rs: Row[]) => `${Math.round(median(rs.map((r) => r.iops)))} IOPS, ${median(rs.map((r) => r.lat_us)).toFixed(0)} µs`;
const fmtBw = (rs: Row[]) => `${(median(rs.map((r) => r.bw)) / 1048576).toFixed(1)} MiB/s`;

/** The median of the rounds' ratios and their range, e.g. [0.85, "0.77-0.89"]. */
function summary(ratios: number[]): [number, string] {
  if (!ratios.length) return [NaN, 'none'];
  return [median(ratios), `${Math.min(...ratios).toFixed(2)}-${Math.max(...ratios).toFixed(2)}`];
}

/**
 * A ratio as the table prints it beside its target: two decimals, three where two would round a
 * miss up to the target's own figure (0.568x against 0.57x printed "0.57x ... missed").
 */
function fmtRatio(ratio: number, target: number): string {
  const two = ratio.toFixed(2);
  return ratio < target && Number(two) >= target ? `${ratio.toFixed(3)}x` : `${two}x`;
}

function verdict(ratio: number, target: number): string {
  return Number.isNaN(ratio) ? 'not measured' : ratio >= target ? 'met' : 'missed';
}

/**
 * One line per job. A device's figure is its median over the rounds; a ratio is the median of
 * the rounds' own ratios (each cldd figure against loop's in the same round, measured minutes
 * apart at most), with their range beside it.
 */
function table(rows: Row[], zeroCopy: boolean): string[] {
  const jobs = [...new Set(rows.map((r) => r.job))];
  const copy = rows.some((r) => r.device === 'cldd-copy');
  const reference = rows.some((r) => r.device === 'ublksrv');
  const rounds = new Set(rows.map((r) => r.round)).size;
  let head = `| fio job | cldd | loop | ratio | ${rounds} rounds | target | |`;
  let rule = '|---|---:|---:|---:|---:|---:|---|';
  if (copy) (head += ` cldd --no-zero-copy | ratio | ${rounds} rounds |`), (rule += '---:|---:|---:|');
  if (reference) (head += ` ublksrv | cldd / ublksrv | ${rounds} rounds |`), (rule += '---:|---:|---:|');
  const lines = [head, rule];
  for (const job of jobs) {
    const seq = job.includes('1m');
    const value = (r: Row) => (seq ? r.bw : r.iops);
    const of = (device: Row['device']) => rows.filter((r) => r.job === job && r.device === device);
    const loop = of('loop');
    const fmt = (device: Row['device']) => (seq ? fmtBw : fmtIops)(of(device));
    const ratios = (device: Row['device'], base: Row[] = loop) =>
      of(device).flatMap((r) => {
        const l = base.find((x) => x.round === r.round);
        return l ? [value(r) / value(l)] : [];
      });
    const [ratio, range] = summary(ratios('cldd'));
    const copying = !zeroCopy && job in COPYING_TARGETS;
    const target = copying ? COPYING_TARGETS[job] : TARGETS[job];
    const note = seq ? (copying ? ' (copying kernel)' : ' (zero copy)') : '';
    let line = `| ${job} | ${fmt('cldd')} | ${fmt('loop')} | ${fmtRatio(ratio, target)} | ${range} | ${target}x${note} | ${verdict(ratio, target)} |`;
    if (copy) {
      const [copyRatio, copyRange] = summary(ratios('cldd-copy'));
      line += ` ${fmt('cldd-copy')} | ${copyRatio.toFixed(2)}x | ${copyRange} |`;
    }
    if (reference) {
      const [refRatio, refRange] = summary(ratios('cldd', of('ublksrv')));
      line += ` ${fmt('ublksrv')} | ${refRatio.toFixed(2)}x | ${refRange} |`;
    }
    lines.push(line);
  }
  return lines;
}

/** A written-area first-touch job's "before" is the plain job's, measured once per round. */
const WRITTEN_AREA = 'first-touch-written-area-';
const beforeJob = (job: string): string => job.replace(WRITTEN_AREA, 'first-touch-');

/**
 * First touch: each device's job right after enable against the same job before it, in the
 * same round; cldd's ratio is held to the target, dm-snapshot's is printed beside it, and for a
 * change area never written, the loop device's into a fresh sparse file: what the file system's
 * allocation alone leaves of the job.
 *
 * At QD1 the allocation's cost is also turned into a bound on cldd's own ratio: a QD1 job does
 * one request (a write and its fsync) at a time, so 1/IOPS is its time, and loop's added time
 * into the sparse file (1/after - 1/before) is what the file system adds to each request for
 * the allocation alone. A server that paid that and nothing else after enable, no map to make
 * durable, would get its own before-time over its before-time plus that. The commit a
 * persistent copy-on-write store needs (its map write and flush, after the data's) comes on top,
 * so the target can only be met where this bound is comfortably above it (docs/benchmarks.md,
 * "Where a never-written QD1+fsync first touch's time goes, step by step").
 */
function firstTouchTable(rows: Row[]): string[] {
  rows = rows.filter((r) => r.job in TARGETS);
  const jobs = [...new Set(rows.filter((r) => r.phase === 'after').map((r) => r.job))];
  const rounds = new Set(rows.map((r) => r.round)).size;
  const lines = [
    `| fio job | cldd before | cldd after | ratio | ${rounds} rounds | target | | dm-snapshot before | after | ratio | ${rounds} rounds | loop into a sparse file | ${rounds} rounds | the allocation's bound on cldd's ratio (QD1) | ${rounds} rounds |`,
    '|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|',
  ];
  for (const job of jobs) {
    const of = (device: Row['device'], phase: Row['phase']) =>
      rows.filter((r) => r.job === (phase === 'before' ? beforeJob(job) : job) && r.device === device && r.phase === phase);
    const ratios = (device: Row['device']) =>
      of(device, 'after').flatMap((a) => {
        const b = of(device, 'before').find((x) => x.round === a.round);
        return b ? [a.iops / b.iops] : [];
      });
    const [ratio, range] = summary(ratios('cldd'));
    const [dmRatio, dmRange] = summary(ratios('dm-snapshot'));
    const [loopRatio, loopRange] = summary(ratios('loop'));
    // Per round: cldd's time per request before enable, and what loop's allocation added to its own.
    const bounds = /-qd1(-|$)/.test(job)
      ? of('cldd', 'before').flatMap((b) => {
          const lb = of('loop', 'before').find((x) => x.round === b.round);
          const la = of('loop', 'after').find((x) => x.round === b.round);
          if (!lb || !la) return [];
          const added = Math.max(0, 1 / la.iops - 1 / lb.iops);
          return [1 / b.iops / (1 / b.iops + added)];
        })
      : [];
    const [bound, boundRange] = summary(bounds);
    const target = TARGETS[job];
    lines.push(
      `| ${job} | ${fmtIops(of('cldd', 'before'))} | ${fmtIops(of('cldd', 'after'))} | ${fmtRatio(ratio, target)} | ${range} | ${target}x | ${verdict(ratio, target)} |` +
        ` ${fmtIops(of('dm-snapshot', 'before'))} | ${fmtIops(of('dm-snapshot', 'after'))} | ${dmRatio.toFixed(2)}x | ${dmRange} |` +
        (Number.isNaN(loopRatio) ? ' – | – |' : ` ${loopRatio.toFixed(2)}x | ${loopRange} |`) +
        (Number.isNaN(bound) ? ' – | – |' : ` ${bound.toFixed(2)}x | ${boundRange} |`),
    );
  }
  return lines;
}

/**
 * Changed-block tracking's cost: 4 KiB random writes at QD1 on the plain master to chunks not yet
 * written in the tracking period (each first write waits for its mark's commit) against the same
 * job once every chunk is marked. No target: dm-era, which tracks the same way, pays the same.
 */
function trackingTable(rows: Row[]): string[] {
  const rounds = new Set(rows.map((r) => r.round)).size;
  const lines = [`| fio job | new period | chunks marked | ratio | ${rounds} rounds |`, '|---|---:|---:|---:|---:|'];
  for (const job of new Set(rows.map((r) => r.job))) {
    const of = (phase: Row['phase']) => rows.filter((r) => r.job === job && r.phase === phase);
    const [ratio, range] = summary(
      of('after').flatMap((a) => {
        const b = of('before').find((x) => x.round === a.round);
        return b ? [a.iops / b.iops] : [];
      }),
    );
    lines.push(`| ${job} | ${fmtIops(of('after'))} | ${fmtIops(of('before'))} | ${ratio.toFixed(2)}x | ${range} |`);
  }
  return lines;
}

/** Resync against dd of the same bytes, the daemons' memory, and the map's memory per TiB. */
function otherTable(resyncs: Resync[], rss: Rss['rss'][], mapMiBPerTiB: number): string[] {
  const MiB = 1048576;
  const lines = ['| measurement | cldd | reference | ratio | range | target | |', '|---|---:|---:|---:|---:|---:|---|'];
  const cldd = resyncs.map((r) => r.resync.bytes / MiB / r.resync.seconds);
  const dd = resyncs.map((r) => r.resync.bytes / MiB / r.dd_seconds);
  const [ratio, range] = summary(resyncs.map((r) => r.dd_seconds / r.resync.seconds));
  const mib = median(resyncs.map((r) => r.resync.bytes / MiB));
  lines.push(
    `| resync of the QD32 first-touch job's blocks (median ${mib.toFixed(0)} MiB) | ${median(cldd).toFixed(1)} MiB/s | dd over written blocks: ${median(dd).toFixed(1)} MiB/s | ${fmtRatio(ratio, TARGETS.resync)} | ${range} | ${TARGETS.resync}x | ${verdict(ratio, TARGETS.resync)} |`,
  );
  const intoNew = resyncs.filter((r) => r.dd_new_seconds !== undefined);
  if (intoNew.length) {
    const [newRatio, newRange] = summary(intoNew.map((r) => (r.dd_new_seconds as number) / r.resync.seconds));
    const ddNew = median(intoNew.map((r) => r.resync.bytes / MiB / (r.dd_new_seconds as number)));
    lines.push(`| the same resync against dd into a new file (allocating) | | ${ddNew.toFixed(1)} MiB/s | ${newRatio.toFixed(2)}x | ${newRange} | | |`);
  }
  const copied = resyncs.filter((r) => r.runs !== undefined && r.runs_copy !== undefined);
  for (const r of copied) {
    // The list is read from the map the resync starts from: anything else copied other blocks.
    if (r.runs!.bytes !== r.resync.bytes) {
      throw new Error(`round ${r.round}: the list of runs holds ${r.runs!.bytes} bytes, the resync copied ${r.resync.bytes}`);
    }
  }
  if (copied.length) {
    const seconds = (r: Resync) => r.runs_copy!.seconds;
    const runs = median(copied.map((r) => r.runs!.runs));
    const program = median(copied.map((r) => r.resync.bytes / MiB / seconds(r)));
    const [toProgram, toProgramRange] = summary(copied.map((r) => seconds(r) / r.resync.seconds));
    const [programToDd, programToDdRange] = summary(copied.map((r) => r.dd_seconds / seconds(r)));
    lines.push(
      `| the same resync against a program copying only its runs (median ${runs.toFixed(0)} runs: a read and a write each, then fdatasync) | | ${program.toFixed(1)} MiB/s | ${toProgram.toFixed(2)}x | ${toProgramRange} | | |`,
      `| that program's copy against dd over written blocks | | | ${programToDd.toFixed(2)}x | ${programToDdRange} | | |`,
    );
  }
  for (const r of rss) {
    const name = r.device === 'cldd-copy' ? 'daemon memory, --no-zero-copy pair' : 'daemon memory';
    const hwm = r.hwm_kib / 1024;
    // Anonymous memory is the daemon's own; file pages are node's binary and libraries, mapped.
    const split = r.anon_kib !== undefined && r.file_kib !== undefined ? `; ${(r.anon_kib / 1024).toFixed(1)} anonymous, ${(r.file_kib / 1024).toFixed(1)} file` : '';
    lines.push(
      `| ${name}, defaults, after all jobs: VmRSS (VmHWM) | ${(r.rss_kib / 1024).toFixed(1)} MiB (${hwm.toFixed(1)} MiB)${split} | | | | ≤ ${RSS_LIMIT_MIB} MiB at the peak | ${hwm <= RSS_LIMIT_MIB ? 'met' : 'missed'} |`,
    );
  }
  lines.push(`| map memory per TiB of data area at 4 KiB blocks, every block redirected | ${mapMiBPerTiB.toFixed(1)} MiB | | | | | |`);
  return lines;
}

/**
 * Builds scripts/bench/copy-runs.c into build/bench/ and returns its path. Statically linked: the
 * VM's guests run it, and their C library may be older than the one it is built against.
 */
function buildCopyRuns(): string {
  const out = resolve('build/bench/copy-runs');
  mkdirSync(resolve('build/bench'), { recursive: true });
  const cc = spawnSync('cc', ['-O2', '-Wall', '-static', '-o', out, 'scripts/bench/copy-runs.c'], { encoding: 'utf8' });
  if (cc.error || cc.status !== 0) {
    throw new Error(`cc could not build scripts/bench/copy-runs.c (it needs a C compiler and a static C library, as build-essential has): ${cc.error?.message ?? cc.stderr.trim()}`);
  }
  return out;
}

async function main(): Promise<void> {
  const copyRuns = buildCopyRuns();
  const native = existsSync('/dev/ublk-control') && process.getuid?.() === 0;
  // CLDD_BENCH_SUITES picks some of the VM's kernels (e.g. "trixie-backports") to try a change.
  const suites = process.env.CLDD_BENCH_SUITES?.split(/\s+/).filter(Boolean);
  const runs: Run[] = native
    ? [{ suite: null, modes: 'zero-copy no-zero-copy' }]
    : [
        { suite: 'bookworm-backports', modes: 'zero-copy' },
        { suite: 'trixie-backports', modes: 'zero-copy no-zero-copy' },
      ].filter((r) => !suites || suites.includes(r.suite));
  const seconds = process.env.CLDD_BENCH_RUNTIME ?? 10;
  const map = new BlockMap(2 ** 40 / 4096, 4096);
  map.assign(0, map.blocks, true);
  const mapMiBPerTiB = map.residentBytes / 1048576;
  const text: string[] = [
    `Measured ${new Date().toISOString().slice(0, 10)}: fio (io_uring, O_DIRECT, ${seconds} s per job) on the cldd master and on a kernel loop device over an identical backing file on the same file system, each job on every device in turn in the same machine, in ${process.env.CLDD_BENCH_ROUNDS ?? 3} rounds.`,
    "Figures are medians over the rounds; a ratio is the median of each round's ratio to loop, with their range beside it. A latency is a request's completion, and for the fsync rows a write's and its fsync's together.",
    'ext4-randwrite-4k-fsync: ext4 made anew on each device (no discards, no lazy initialisation), one writer of 4 KiB random writes through the page cache (psync) to a 64 MiB file, each followed by fsync: every fsync is a journal commit ending in a FUA write to the device. Its target is the flush row\'s.',
    'Software emulation inflates user-space cost, so only the ratios within one table mean anything.',
    "cldd runs with its defaults: among them, each queue thread polls its ring for up to 100 µs before it sleeps (POLL_US; docs/serving.md, \"The queue thread's wait\"); neither loop nor the C server polls.",
    "Targets are issue 12's. The 1 MiB rows' 0.9x applies where the kernel has zero copy (6.16+); on 6.12, which copies every request through the daemon, the target is the 0.57x (read) and 0.55x (write) that the issue measured there.",
    'First touch: the same fio job on the same device right after a snapshot is taken, writing half the master once with no ramp (every write then lands on a block not yet redirected in it, and each one counts), against that job just before, in the same round; dm-snapshot (persistent, 4 KiB chunks, exception store on a loop device over a file on the same file system, origin the loop device above) measured the same way beside it.',
    "Two conditions of the change area: never written (its blocks given back to the file system before each job, as in a file store's first snapshot; dm-snapshot's exception store a fresh sparse file), where the file system allocates each block a first touch lands on, and, in the written-area rows, written all over by an earlier snapshot, as every later snapshot finds it (dm-snapshot's store written with zeros). For the first, the loop device's ratio into a fresh sparse file against its filled one shows what the allocation alone leaves of the job. At QD1, where a job's time per request is 1/IOPS, the last column turns that into a bound on cldd's ratio: cldd's time per request before enable, over that time plus what the allocation added to each of loop's requests. A server that paid nothing after enable but the allocation, with no map to make durable, would get that ratio; the map's write and flush come on top (see \"Where a never-written QD1+fsync first touch's time goes, step by step\" below).",
    "ext4-in-snapshot-randwrite-4k-fsync, in the first-touch table: the ext4 job above, on ext4 made on the master, just before and right after a snapshot (cldd enable, which freezes the file system), into a change area never written; dm-snapshot the same way, ext4 on its origin and a fresh sparse exception store. In a fresh snapshot nearly every write is a first touch, the journal's too, and each fsync's journal commit ends in a FUA write: the users' case, a live file system while its backup is taken. Its target is the first-touch fsync row's.",
    'Changed-block tracking: after the first-touch jobs, on the plain master in the tracking period their last snapshot started, 4 KiB random writes at QD1 to chunks not yet written in it (each waits for the commit of its chunk\'s mark), against the same job once a sequential pass has written every chunk; the plain rows above run in that marked state.',
    "Resync: disabling after the QD32 first-touch job (and a sync of its writes, then a flush of the master, which commits its map) until the resync is done, against dd (1 MiB blocks, conv=fsync) copying as many bytes between two files on the same file system: over blocks written before (conv=notrunc), as the resync overwrites blocks the fill allocated, which is the target's reference; and into a new file, where the file system's allocation adds to the copy. Beside them, a program that copies exactly the resync's runs and does nothing else (scripts/bench/copy-runs.c; the runs read from the map before the disable; per run a blocking read from the change area and a blocking write to the same offset of the loop device's file, written before; then an fdatasync): what the scattered runs leave of dd's rate to any program that copies only them.",
  ];
  for (const run of runs) {
    const r = await measure(run, copyRuns);
    const where = run.suite
      ? `In the test VM (qemu TCG, -cpu ${process.env.CLDD_VM_CPU ?? 'max,-erms'}, 2 vCPUs), Debian ${run.suite} kernel ${r.kernel}`
      : `Natively on this host, kernel ${r.kernel}`;
    const how = r.zeroCopy ? 'zero copy' : 'every request copied through the daemon (no zero copy in this kernel)';
    text.push(
      '',
      `${where}; backing files on ${r.fs}; cldd with ${how}:`,
      '',
      ...table(r.rows.filter((x) => !x.phase), r.zeroCopy),
      '',
      `First touch after enable, ${r.kernel}:`,
      '',
      ...firstTouchTable(r.rows.filter((x) => x.phase)),
      '',
      `Changed-block tracking, ${r.kernel}:`,
      '',
      ...trackingTable(r.rows.filter((x) => x.phase && x.job.startsWith('tracking-'))),
      '',
      `Resync and memory, ${r.kernel}:`,
      '',
      ...otherTable(r.resyncs, r.rss, mapMiBPerTiB),
    );
  }
  console.log(text.join('\n'));
  await writeSection('device', 'Devices: cldd master versus a loop device', text.join('\n'));
}

main().catch((err) => {
  console.error(`bench: ${err instanceof Error ? err.message : String(err)}`);
  process.exit(1);
});
