// What a resync will copy, for scripts/bench/copy-runs.c to copy without cldd: run by
// device-inside.sh after a first-touch job and a flush of the master, before the disable. Reads
// the store's committed map (read-only, recovered as open does) and writes one "from to length"
// line per redirected run: from the store's change area to the run's own offset in another file
// (where the resync writes the store's data area). Prints {"runs", "bytes"}; the bench checks
// that bytes is what the resync copied.
//   node scripts/bench/resync-runs.mjs STORE LIST
import { writeFileSync } from 'node:fs';
import { FileStore } from '../../dist/io/file-store.js';
import { recoverStore } from '../../dist/engine/open.js';

const [storePath, list] = process.argv.slice(2);
if (!storePath || !list) throw new Error('usage: resync-runs.mjs STORE LIST');

const store = await FileStore.open(storePath, { readOnly: true });
let map;
let layout;
try {
  // The map as open recovers it (and refuses a damaged one), without writing anything.
  ({ map, sb: { layout } } = await recoverStore(store));
} finally {
  await store.close();
}

const bs = layout.blockSize;
const lines = [];
let runs = 0;
let bytes = 0;
map.forEachRun(0, layout.blocks, (start, end, redirected) => {
  if (!redirected) return;
  const length = (end - start) * bs;
  lines.push(`${layout.changeOffset + start * bs} ${start * bs} ${length}`);
  runs++;
  bytes += length;
});
lines.push('');
writeFileSync(list, lines.join('\n'));
console.log(JSON.stringify({ runs, bytes }));
