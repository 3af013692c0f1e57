import { access, mkdir, readFile, readlink, rm, symlink } from 'node:fs/promises';
import { join } from 'node:path';
import { runWithin } from '../deadline.js';
import { replaceFileDurably } from '../durable-file.js';
import { formatConfig, type PairConfig } from '../protocol/config.js';
import { configPath, type Paths } from '../protocol/paths.js';
import { renderUnit } from './systemd-unit.js';

/** systemctl answers in a second or two; after this long systemd is not answering at all. */
const SYSTEMCTL_BOUND_MS = 60_000;

const systemctl = (...args: string[]) => runWithin('systemctl', args, SYSTEMCTL_BOUND_MS, `systemctl ${args.join(' ')}`);

const UNIT_DIR = process.env.CLDD_UNIT_DIR || '/etc/systemd/system';
const WANTS = 'local-fs.target.wants';

/** Whether systemd runs this machine (sd_booted(3)). */
export async function systemdRunning(): Promise<boolean> {
  return access('/run/systemd/system').then(
    () => true,
    () => false,
  );
}

/**
 * Makes a pair come back at boot: /etc/cldd/NAME.conf, the cldd@.service template, and the
 * unit enabled. With systemd running, systemctl enables it; without (a container, a chroot),
 * the same symlink systemctl would make is made by hand.
 */
export async function persist(paths: Paths, name: string, config: PairConfig): Promise<string> {
  // Replaced whole and synced (durable-file.ts): every pair's unit is this one template.
  await replaceFileDurably(configPath(paths, name), formatConfig(config), 0o644, 'the pair configuration');
  const template = join(UNIT_DIR, 'cldd@.service');
  const text = await renderUnit();
  if ((await readFile(template, 'utf8').catch(() => null)) !== text) await replaceFileDurably(template, text, 0o644, 'the systemd unit');
  const unit = `cldd@${name}.service`;
  if (await systemdRunning()) {
    await systemctl('daemon-reload');
    await systemctl('enable', unit);
  } else {
    await mkdir(join(UNIT_DIR, WANTS), { recursive: true });
    const link = join(UNIT_DIR, WANTS, unit);
    if ((await readlink(link).catch(() => null)) !== '../cldd@.service') {
      await rm(link, { force: true });
      await symlink('../cldd@.service', link);
    }
  }
  return unit;
}

/** Undoes persist() for one pair; the template stays for the others. */
export async function unpersist(paths: Paths, name: string): Promise<void> {
  const unit = `cldd@${name}.service`;
  if (await systemdRunning()) await systemctl('disable', unit).catch(() => {});
  await rm(join(UNIT_DIR, WANTS, unit), { force: true });
  await rm(configPath(paths, name), { force: true });
}
