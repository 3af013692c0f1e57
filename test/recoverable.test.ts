/**
 * `cldd add --force` must not reformat a store whose pair's daemon died with its devices still
 * up (they wait for user recovery, with a filesystem on them): refuseIfRecoverable says so.
 */
import { execFileSync, spawn } from 'node:child_process';
import { mkdtempSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, expect, test } from 'vitest';
import { refuseIfRecoverable } from '../src/daemon/daemon.js';
import { defaultPaths } from '../src/protocol/paths.js';
import { writeState } from '../src/protocol/state-file.js';

const dir = mkdtempSync(join(tmpdir(), 'cldd-recoverable-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** A pid that is surely not running: a child that has exited and been reaped. */
async function deadPid(): Promise<number> {
  const child = spawn(process.execPath, ['-e', '']);
  await new Promise((resolve) => child.on('exit', resolve));
  return child.pid!;
}

test.skipIf(process.getuid?.() !== 0)('a forced format is refused while a dead daemon\'s devices wait for recovery', async () => {
  const paths = { ...defaultPaths({}), runDir: join(dir, 'run') };
  execFileSync('mkdir', ['-p', paths.runDir]);
  const backing = join(dir, 'store.img');
  writeFileSync(backing, '');
  // A block device node standing for the master the dead daemon left (only its type matters).
  const master = join(dir, 'ublkb-left');
  execFileSync('mknod', [master, 'b', '7', '250']);
  const st = statSync(backing);
  const state = {
    name: 'left',
    pid: await deadPid(),
    backing,
    backingId: `${st.dev}:${st.ino}`,
    master: { id: 0, path: master },
    slave: null,
    index: null,
    startedAt: Date.now(),
  };
  await writeState(paths, state);
  await expect(refuseIfRecoverable(paths, backing)).rejects.toMatchObject({ code: 'EBUSY', message: expect.stringMatching(/waiting for it.*without --force/) });
  // Once the devices are gone (cldd remove --force), formatting is the user's call again.
  rmSync(master);
  await expect(refuseIfRecoverable(paths, backing)).resolves.toBeUndefined();
  // A live daemon's pair is refuseIfAttached's business, not this check's.
  execFileSync('mknod', [master, 'b', '7', '250']);
  await writeState(paths, { ...state, pid: process.pid });
  await expect(refuseIfRecoverable(paths, backing)).resolves.toBeUndefined();
});
