/**
 * The folders of src/ are layers (README, "Layout"): a module imports from its own folder and
 * from the layers below it, never from one above or beside it. This reads every import of every
 * module of src/ and fails on one that breaks the rule, naming the file and the import.
 */
import { readdirSync, readFileSync } from 'node:fs';
import { dirname, join, normalize, relative } from 'node:path';
import { describe, expect, test } from 'vitest';

/** What each folder may import besides itself; '.' is src/'s own files (errors, printable, devnum). */
const MAY_IMPORT: Record<string, readonly string[]> = {
  '.': [],
  native: ['.'],
  io: ['.', 'native'],
  format: ['.', 'native', 'io'],
  engine: ['.', 'format', 'io'],
  system: ['.', 'native'],
  ublk: ['.', 'native', 'io', 'format', 'engine'],
  backup: ['.', 'io', 'format'],
  protocol: ['.'],
  daemon: ['.', 'native', 'io', 'format', 'engine', 'system', 'ublk', 'backup', 'protocol'],
  cli: ['.', 'native', 'io', 'format', 'engine', 'system', 'ublk', 'backup', 'protocol', 'daemon'],
};

function modules(dir: string): string[] {
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) =>
    e.isDirectory() ? modules(join(dir, e.name)) : e.name.endsWith('.ts') ? [join(dir, e.name)] : [],
  );
}

/** The layer of a path inside src/. */
const layerOf = (path: string): string => {
  const parts = relative('src', path).split('/');
  return parts.length === 1 ? '.' : parts[0];
};

/** Every relative module specifier of a file: static imports and re-exports, and import(). */
function imports(text: string): string[] {
  const found: string[] = [];
  for (const m of text.matchAll(/(?:\bfrom\s+|\bimport\s*\(\s*|^import\s+)(['"])(\.{1,2}\/[^'"]+)\1/gm)) found.push(m[2]);
  return found;
}

const files = modules('src');

describe('the layers of src/', () => {
  test('every folder of src/ is a layer', () => {
    const layers = [...new Set(files.map(layerOf))].sort();
    expect(layers.filter((l) => !(l in MAY_IMPORT))).toEqual([]);
  });

  test('every import points to its own layer or one it may use', () => {
    const broken: string[] = [];
    for (const file of files) {
      const from = layerOf(file);
      for (const spec of imports(readFileSync(file, 'utf8'))) {
        const target = normalize(join(dirname(file), spec));
        if (!target.startsWith('src/')) {
          broken.push(`${file}: ${spec} (outside src/)`);
          continue;
        }
        const to = layerOf(target);
        if (to !== from && !MAY_IMPORT[from]?.includes(to)) broken.push(`${file}: ${spec} (${from} may not import ${to})`);
      }
    }
    expect(broken).toEqual([]);
  });

  test('only src/native/ loads the addon', () => {
    const loaders = files.filter((f) => layerOf(f) !== 'native' && /cldd_native\.node|createRequire/.test(readFileSync(f, 'utf8')));
    expect(loaders).toEqual([]);
  });

  test('the table itself only points downwards: each layer may use only layers listed before it', () => {
    const order = Object.keys(MAY_IMPORT);
    const upward = order.flatMap((layer, i) => MAY_IMPORT[layer].filter((used) => order.indexOf(used) >= i).map((used) => `${layer} -> ${used}`));
    expect(upward).toEqual([]);
  });

  test('the rule itself: an import upwards is found', () => {
    // The check above must not pass by finding nothing: it reads what these lines import.
    expect(imports("import { Volume } from '../engine/volume.js';\nexport { x } from './y.js';\nconst m = await import('../daemon/daemon.js');")).toEqual([
      '../engine/volume.js',
      './y.js',
      '../daemon/daemon.js',
    ]);
  });
});
