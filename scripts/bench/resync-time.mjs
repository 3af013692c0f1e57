// Disables a pair and times its resync: run by device-inside.sh, prints one JSON line
// {"blocks", "bytes", "seconds", "disable_seconds"}. It asks the daemon's socket itself, every 10 ms, because
// `cldd disable --wait` polls once a second when not on a terminal, which is the whole resync
// of a few hundred MiB.
import { connectPair } from '../../dist/cli/pairs.js';

const name = process.argv[2];
const client = await connectPair(name);
try {
  const before = await client.call('status');
  const start = performance.now();
  const { blocks } = await client.call('disable');
  const disabled = performance.now();
  for (;;) {
    const s = await client.call('status');
    if (!s.resync?.running && !(s.resync?.blocksLeft > 0)) break;
    await new Promise((r) => setTimeout(r, 10));
  }
  const seconds = (performance.now() - start) / 1000;
  // disable_seconds: the part the disable itself took (its commit, before the copy starts).
  console.log(JSON.stringify({ blocks, bytes: blocks * before.blockSize, seconds, disable_seconds: (disabled - start) / 1000 }));
} finally {
  client.close();
}
