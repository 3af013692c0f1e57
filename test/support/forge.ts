import {
  decodeMapSlot,
  encodeMapSlot,
  encodeSuperblock,
  MAP_SLOT_HEADER,
  mapDigestTerm,
  mapSlotOffset,
  superblockOffset,
} from '../../src/format/format.js';
import { readMap, readSuperblocks } from '../../src/format/recovery.js';
import type { MemoryStore } from '../../src/io/memory-store.js';

/**
 * Writes a map page the way a commit does (the older slot, then both superblock copies with the
 * new map commit and digest). Tests use it to make stores only a bug could produce (bits in a
 * plain store, bits past the end) whose metadata is otherwise consistent, so that the finding
 * under test is the only one.
 */
export async function commitPage(store: MemoryStore, page: number, payload: Uint8Array): Promise<void> {
  const { sb } = await readSuperblocks(store);
  const map = await readMap(store, sb, () => {});
  const { layout } = sb;
  const commit = map.nextCommit;
  const sequence = map.sequence[page] + 1;
  const digest = (map.digest - mapDigestTerm(page, map.sequence[page], map.slotCommit[page]) + mapDigestTerm(page, sequence, commit)) >>> 0;
  store.writeSync(encodeMapSlot(layout, sb.uuid, page, sequence, payload, commit, digest), mapSlotOffset(layout, page, 1 - map.slot[page]));
  const image = encodeSuperblock({ ...sb, generation: sb.generation + 1, map: { commit, digest } });
  for (const copy of [0, 1]) store.writeSync(image, superblockOffset(copy, layout.blockSize));
}

/**
 * Rewrites a store as version 1 wrote it: superblocks without the map record, slots without
 * their commit and digest. The bytes are exactly what version 1 produced for the same history.
 */
export async function downgradeToVersion1(store: MemoryStore): Promise<void> {
  const { sb } = await readSuperblocks(store);
  const { layout } = sb;
  if (sb.version !== 2) throw new Error(`downgradeToVersion1 takes a version 2 store (format it with { version: 2 }), not version ${sb.version}`);
  const slot = new Uint8Array(layout.blockSize);
  for (let page = 0; page < layout.mapPages; page++) {
    for (const s of [0, 1]) {
      store.readSync(slot, mapSlotOffset(layout, page, s));
      const v = decodeMapSlot(layout, sb.uuid, page, slot);
      if (!v.ok) continue;
      const image = encodeMapSlot(layout, sb.uuid, page, v.header.sequence, slot.subarray(MAP_SLOT_HEADER));
      store.writeSync(image, mapSlotOffset(layout, page, s));
    }
  }
  const image = encodeSuperblock({ ...sb, map: null, version: 1 });
  for (const copy of [0, 1]) store.writeSync(image, superblockOffset(copy, layout.blockSize));
}
