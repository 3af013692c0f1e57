/**
 * Freezes and thaws a mounted filesystem (FIFREEZE / FITHAW). The daemon's implementation is
 * the addon's (src/system/system.ts); tests of the daemon's logic without devices pass their own.
 */
export interface Freezer {
  freeze(mountpoint: string): Promise<void>;
  thaw(mountpoint: string): Promise<void>;
}
