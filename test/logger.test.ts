/**
 * The daemon's log: a pair's daemon started by `cldd add` writes it to /run/cldd/NAME.log on
 * tmpfs, which can fill up. A line that cannot be written must be lost, not the daemon.
 */
import { mkdtemp, open, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, expect, test } from 'vitest';
import { dist, limitedChild } from './support/file-limit.js';

let dir: string;
beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), 'cldd-log-'));
});
afterEach(async () => {
  await rm(dir, { recursive: true, force: true });
});

test('a full log file loses lines, not the daemon; the next line that gets through counts them', async () => {
  // A child whose files may hold 1024 bytes, its stderr such a file: ten lines of 100 bytes fit,
  // the eleventh in part. Then the limit is lifted (as space is freed) and it logs once more.
  const script = `
    import { stderrLogger } from ${dist('daemon', 'logger.js')};
    const log = stderrLogger('info', 'full', false);
    for (let i = 0; i < 20; i++) log.info(String(i).padStart(3, '0') + ' ' + 'x'.repeat(47));
    console.log('alive');
    process.stdin.once('data', () => {
      log.warn('after');
      console.log('done');
      process.exit(0);
    });`;
  const logPath = join(dir, 'full.log');
  const logFile = await open(logPath, 'w');
  const child = limitedChild(1024, script, [], logFile.fd);
  await logFile.close();
  try {
    expect(await child.line('it to log 20 lines into a file that holds 10')).toBe('alive');
    await child.lift();
    child.send('go\n');
    expect(await child.line('its line after the limit was lifted')).toBe('done');
    expect(await child.exited()).toBe(0);
  } finally {
    child.kill();
  }
  const log = (await readFile(logPath, 'utf8')).split('\n');
  expect(log.slice(0, 10).map((l) => l.replace(/^.* info: /, '').slice(0, 3))).toEqual(['000', '001', '002', '003', '004', '005', '006', '007', '008', '009']);
  // The eleventh line, written in part, then the count on a line of its own, then the line.
  expect(log[10]).toMatch(/^\S+ cldd\[full\] in/);
  expect(log[11]).toMatch(/ cldd\[full\] warn: 10 log lines before this one could not be written \(EFBIG\)$/);
  expect(log[12]).toMatch(/ cldd\[full\] warn: after$/);
  expect(log.length).toBe(14); // and the final newline's empty remainder
});
