import { join } from 'node:path';
import { CldError } from '../errors.js';

/** Where daemons keep their sockets and state, and where pair configurations live. */
export interface Paths {
  runDir: string;
  configDir: string;
}

export function defaultPaths(env: NodeJS.ProcessEnv = process.env): Paths {
  return {
    runDir: env.CLDD_RUN_DIR || '/run/cldd',
    configDir: env.CLDD_CONFIG_DIR || '/etc/cldd',
  };
}

export const socketPath = (paths: Paths, name: string) => join(paths.runDir, `${name}.sock`);
export const statePath = (paths: Paths, name: string) => join(paths.runDir, `${name}.json`);
export const configPath = (paths: Paths, name: string) => join(paths.configDir, `${name}.conf`);

const NAME = /^[a-z0-9][a-z0-9_-]{0,31}$/;

/** Pair names become file and device names: lower-case letters, digits, - and _, up to 32. */
export function checkName(name: string): string {
  if (!NAME.test(name)) {
    throw new CldError('EINVAL', `"${name}" is not a valid pair name (1-32 of a-z, 0-9, - and _, starting with a letter or digit)`);
  }
  return name;
}
