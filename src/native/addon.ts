/**
 * The one module that loads the native addon (build/Release/cldd_native.node, built by
 * node-gyp from binding.gyp). Found by walking up from this file, so it works from src/ (tests)
 * and from dist/ (the built package) alike.
 */
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { CldError } from '../errors.js';
import type { NativeAddon } from './native.js';

const ADDON = join('build', 'Release', 'cldd_native.node');

let loaded: NativeAddon | null = null;

export function addon(): NativeAddon {
  if (loaded) return loaded;
  let dir = dirname(fileURLToPath(import.meta.url));
  for (;;) {
    const candidate = join(dir, ADDON);
    if (existsSync(candidate)) {
      loaded = createRequire(import.meta.url)(candidate) as NativeAddon;
      return loaded;
    }
    const parent = dirname(dir);
    if (parent === dir) break;
    dir = parent;
  }
  throw new CldError('ENOENT', `the native addon ${ADDON} is not built (run npm run setup)`);
}
