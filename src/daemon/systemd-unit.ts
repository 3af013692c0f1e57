import { readFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';

const TEMPLATE = fileURLToPath(new URL('../../scripts/systemd/cldd@.service', import.meta.url));

/** The project's directory (the one holding bin/ and dist/), from this module's place in dist/ or src/. */
export const CLDD_HOME = fileURLToPath(new URL('../..', import.meta.url)).replace(/\/$/, '');

/** cldd@.service with this installation's node and project paths filled in. */
export async function renderUnit(nodePath = process.execPath, home = CLDD_HOME): Promise<string> {
  const template = await readFile(TEMPLATE, 'utf8');
  return template.replaceAll('@NODE@', nodePath).replaceAll('@CLDD_HOME@', home);
}
