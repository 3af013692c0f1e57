// Disables a pair and times its resync: run by device-inside.sh, prints one JSON line
// {"blocks", "bytes", "seconds", "disable_seconds"}. It asks for the progress with `waitMs`, which
// the daemon answers the moment the resync ends: `cldd disable --wait` reports the end as soon,
// but also prints, and polling the daemon every 10 ms, as this script did, took CPU from the
// resync it timed (7.3 VM: the copy 1.60-1.65 s with it, 1.12-1.26 s without).
import { connectPair } from '../../dist/cli/pairs.js';

const name = process.argv[2];
const client = await connectPair(name);
try {
  const before = await client.call('status');
  const start = performance.now();
  const { blocks } = await client.call('disable');
  const disabled = performance.now();
  for (;;) {
    const p = await client.call('progress', { waitMs: 10_000 }, 30_000);
    if (p.state === 'plain') break;
    if (!p.running) throw new Error(`the resync stopped with ${p.blocksLeft} blocks left: ${p.error ?? "the daemon's log says why"}`);
  }
  const seconds = (performance.now() - start) / 1000;
  // disable_seconds: the part the disable itself took (its commit, before the copy starts).
  console.log(JSON.stringify({ blocks, bytes: blocks * before.blockSize, seconds, disable_seconds: (disabled - start) / 1000 }));
} finally {
  client.close();
}
