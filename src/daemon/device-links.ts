import { mkdir, readdir, readlink, rm, rmdir, symlink } from 'node:fs/promises';
import { join } from 'node:path';

/**
 * Stable names for a pair's devices: /dev/cldd/NAME/{master,slave} and the original tool's
 * short names /dev/cldmN and /dev/cldsN, all symlinks to /dev/ublkbX kept by the daemon.
 */
export class DeviceLinks {
  constructor(private readonly devDir = process.env.CLDD_DEV_DIR || '/dev') {}

  /** `preferred` if it is free, else the lowest N with no /dev/cldmN or /dev/cldsN yet. */
  async freeIndex(preferred?: number): Promise<number> {
    const used = new Set<number>();
    for (const e of await readdir(this.devDir).catch(() => [] as string[])) {
      const m = /^cld[ms](\d+)$/.exec(e);
      if (m) used.add(Number(m[1]));
    }
    if (preferred !== undefined && !used.has(preferred)) return preferred;
    let n = 0;
    while (used.has(n)) n++;
    return n;
  }

  async create(name: string, index: number, master: string, slave: string | null): Promise<void> {
    const dir = join(this.devDir, 'cldd', name);
    await mkdir(dir, { recursive: true });
    await this.link(master, join(dir, 'master'));
    await this.link(master, join(this.devDir, `cldm${index}`));
    if (slave) await this.setSlave(name, index, slave);
  }

  async setSlave(name: string, index: number, slave: string | null): Promise<void> {
    const paths = [join(this.devDir, 'cldd', name, 'slave'), join(this.devDir, `clds${index}`)];
    for (const path of paths) {
      if (slave) await this.link(slave, path);
      else await rm(path, { force: true });
    }
  }

  async remove(name: string, index: number | null): Promise<void> {
    const dir = join(this.devDir, 'cldd', name);
    await rm(join(dir, 'master'), { force: true });
    await rm(join(dir, 'slave'), { force: true });
    await rmdir(dir).catch(() => {});
    await rmdir(join(this.devDir, 'cldd')).catch(() => {});
    if (index !== null) {
      await rm(join(this.devDir, `cldm${index}`), { force: true });
      await rm(join(this.devDir, `clds${index}`), { force: true });
    }
  }

  private async link(target: string, path: string): Promise<void> {
    const current = await readlink(path).catch(() => null);
    if (current === target) return;
    await rm(path, { force: true });
    await symlink(target, path);
  }
}
