/**
 * Splits a Linux dev_t as Node reports it (stat's dev and rdev) into major and minor numbers,
 * following glibc's encoding: major in bits 8-19 and 32-43, minor in bits 0-7 and 20-31.
 */
export function devMajor(dev: number): number {
  return (Math.floor(dev / 0x100) & 0xfff) | (Math.floor(dev / 0x100000000) & ~0xfff);
}

export function devMinor(dev: number): number {
  return (dev & 0xff) | (Math.floor(dev / 0x1000) & 0xfff00);
}

/** "major:minor", as /proc/self/mountinfo and /sys/dev/block name devices. */
export function devId(dev: number): string {
  return `${devMajor(dev)}:${devMinor(dev)}`;
}
