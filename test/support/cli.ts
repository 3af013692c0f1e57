/**
 * Runs the cldd command line in a child process, as a user runs it, from the current source.
 * src/ is transpiled (no type checks: tsc does those) into a world-readable directory under /tmp
 * together with bin/, the packages the CLI loads and the native addon. So the tests never run a stale dist/, and the
 * CLI also runs as an unprivileged user wherever the checkout is (under /root, say, where that
 * user cannot read it).
 */
import { execFile } from 'node:child_process';
import { chmod, cp, mkdir, mkdtemp, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { dirname, join, relative } from 'node:path';
import ts from 'typescript';

const ROOT = join(__dirname, '..', '..');
/** The uid and gid of nobody: what the unprivileged runs use when the tests run as root. */
const NOBODY = 65534;
/** How long one cldd command of a test may run (each starts node: about 0.3 s here). */
const CLI_TIMEOUT_MS = 60_000;

export interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

export interface RunOptions {
  /** Added to the environment. */
  env?: NodeJS.ProcessEnv;
  /** Run as nobody (through setpriv when the tests run as root). */
  unprivileged?: boolean;
  /** Which of bin/'s programs: cldd unless said. */
  program?: 'cldd' | 'clddsetup';
}

export interface Cli {
  dir: string;
  run(args: string[], options?: RunOptions): Promise<CliResult>;
  remove(): Promise<void>;
}

export async function buildCli(): Promise<Cli> {
  const dir = await mkdtemp('/tmp/cldd-cli-build-');
  await chmod(dir, 0o755);
  for (const file of await sources(join(ROOT, 'src'))) {
    const out = join(dir, 'dist', relative(join(ROOT, 'src'), file)).replace(/\.ts$/, '.js');
    const { outputText } = ts.transpileModule(await readFile(file, 'utf8'), {
      fileName: file,
      compilerOptions: { module: ts.ModuleKind.ESNext, target: ts.ScriptTarget.ES2022 },
    });
    await mkdir(dirname(out), { recursive: true });
    await writeFile(out, outputText);
  }
  await cp(join(ROOT, 'bin'), join(dir, 'bin'), { recursive: true });
  await cp(join(ROOT, 'package.json'), join(dir, 'package.json'));
  // The addon, which every command that reads a store's metadata loads (its checksums).
  await cp(join(ROOT, 'build', 'Release', 'cldd_native.node'), join(dir, 'build', 'Release', 'cldd_native.node'));
  await copyPackage('yargs', ROOT, dir, new Set());

  const run = (args: string[], options: RunOptions = {}) => {
    const program = options.program ?? 'cldd';
    const node = [process.execPath, join(dir, 'bin', `${program}.js`), ...args];
    const asNobody = options.unprivileged && process.getuid?.() === 0;
    const [cmd, ...argv] = asNobody ? ['setpriv', `--reuid=${NOBODY}`, `--regid=${NOBODY}`, '--clear-groups', ...node] : node;
    return new Promise<CliResult>((resolve) => {
      execFile(cmd, argv, { env: { ...process.env, ...options.env }, cwd: '/', timeout: CLI_TIMEOUT_MS }, (err, stdout, stderr) => {
        const code = err ? (typeof err.code === 'number' ? err.code : -1) : 0;
        // Killed by the timeout: say so where a test's assertion will show it.
        const late = err?.killed ? `\n[test] ${program} ${args.join(' ')} did not finish within ${CLI_TIMEOUT_MS / 1000} s and was killed\n` : '';
        resolve({ code, stdout, stderr: stderr + late });
      });
    });
  };
  return { dir, run, remove: () => rm(dir, { recursive: true, force: true }) };
}

async function sources(dir: string): Promise<string[]> {
  const out: string[] = [];
  for (const entry of await readdir(dir, { withFileTypes: true })) {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) out.push(...(await sources(path)));
    else if (entry.name.endsWith('.ts') && !entry.name.endsWith('.d.ts')) out.push(path);
  }
  return out;
}

/** Copies a package and its dependencies, each found as Node finds it: in the nearest node_modules. */
async function copyPackage(name: string, from: string, dest: string, done: Set<string>): Promise<void> {
  let at = from;
  while (!existsSync(join(at, 'node_modules', name, 'package.json'))) {
    if (at === ROOT || dirname(at) === at) throw new Error(`package ${name} not found from ${from}`);
    at = dirname(at);
  }
  const source = join(at, 'node_modules', name);
  if (done.has(source)) return;
  done.add(source);
  await cp(source, join(dest, relative(ROOT, source)), { recursive: true });
  const pkg = JSON.parse(await readFile(join(source, 'package.json'), 'utf8')) as { dependencies?: Record<string, string> };
  for (const dep of Object.keys(pkg.dependencies ?? {})) await copyPackage(dep, source, dest, done);
}
