import { CldError } from '../errors.js';
import type { BlockStore } from '../io/block-store.js';
import { BlockMap } from './block-map.js';
import { ChangeTracking } from './change-tracking.js';
import { uuidString, type Superblock } from '../format/format.js';
import { readMap, readSuperblocks, type Finding } from '../format/recovery.js';

export type { Finding } from '../format/recovery.js';

export interface CheckReport {
  /** True when the store can be opened and every guarantee holds. */
  clean: boolean;
  /** True when the store carries no cldd signature at all (it is not a cldd store). */
  foreign: boolean;
  findings: Finding[];
  superblock: Superblock | null;
  redirected: number | null;
  /** Changed-block tracking as open would load it; null when the format has none or it was unreadable. */
  tracking: { since: number; changedBytes: number; deltaBytes: number | null } | null;
}

/**
 * Verifies a store offline without writing to it, and reports every inconsistency it finds.
 * Errors make the store damaged, and exactly those make open refuse it; warnings are traces of
 * an interrupted write that the next open repairs (a torn superblock copy or map slot next to a
 * valid one, a complete commit whose superblock write is missing), or a version 1 store.
 */
export async function check(store: BlockStore): Promise<CheckReport> {
  const findings: Finding[] = [];
  const error = (message: string) => findings.push({ severity: 'error', message });
  const warning = (message: string) => findings.push({ severity: 'warning', message });
  let found;
  try {
    found = await readSuperblocks(store);
  } catch (err) {
    error(err instanceof Error ? err.message : String(err));
    const foreign = err instanceof CldError && err.code === 'CLDD_FOREIGN';
    return { clean: false, foreign, findings, superblock: null, redirected: null, tracking: null };
  }
  const { sb, reports } = found;
  const { layout } = sb;
  for (const r of reports) {
    if (!r.valid) warning(`superblock copy ${r.copy} at offset ${r.offset} is invalid (${r.reason}); the next open rewrites it`);
  }
  if (found.other === 'other-store') error('the two superblock copies belong to different stores (uuids differ)');
  if (found.other === 'older-state') {
    const [c0, c1] = reports;
    warning(
      `the superblock copies have generations ${c0.generation} and ${c1.generation}: a state change was interrupted; the next open rewrites the older`,
    );
  }
  if (store.size < layout.storeSize) {
    error(`the store has ${store.size} bytes but was formatted with ${layout.storeSize}: it was truncated`);
    return { clean: false, foreign: false, findings, superblock: sb, redirected: null, tracking: null };
  }

  const map = new BlockMap(layout.blocks, layout.blockSize);
  const tracking = ChangeTracking.forStore(layout, sb.epoch);
  const recovered = await readMap(
    store,
    sb,
    (page, payload) => {
      try {
        if (tracking?.isTrackingPage(page)) tracking.load(page, payload);
        else map.load(page, payload);
      } catch (err) {
        error(err instanceof CldError ? err.message : String(err));
      }
    },
    found.other === 'same',
  );
  findings.push(...recovered.findings);
  if (sb.state === 'plain' && map.count > 0) {
    error(`the state is plain but ${map.count} blocks are marked redirected`);
  }
  const clean = !findings.some((f) => f.severity === 'error');
  const trackingReport = tracking && { since: tracking.since, changedBytes: tracking.changedBytes, deltaBytes: tracking.deltaBytes };
  return { clean, foreign: false, findings, superblock: sb, redirected: map.count, tracking: trackingReport };
}

export function describeSuperblock(sb: Superblock): string {
  const l = sb.layout;
  return [
    `uuid ${uuidString(sb.uuid)}${sb.name ? `, name "${sb.name}"` : ''}`,
    `state ${sb.state}, snapshot ${sb.epoch}, generation ${sb.generation}`,
    `${l.blocks} blocks of ${l.blockSize} bytes (${l.blocks * l.blockSize} bytes per area)`,
  ].join('; ');
}
