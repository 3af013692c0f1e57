/**
 * Which signatures libblkid finds on a cldd store are another program's writes over it, and
 * which are the pair's own data showing through the backing store.
 */
import { describe, expect, test } from 'vitest';
import { computeLayout } from '../src/format/format.js';
import { type Signature, signaturesOverStore } from '../src/cli/probe.js';

const MiB = 1 << 20;
const sig = (type: string, offset: number): Signature => ({ type, offset, length: 4, label: null, partitionTable: false });

describe('signatures over a cldd store', () => {
  // 64 MiB at 4 KiB blocks: superblocks 0-8K, map 8K-16K, data 1 MiB-32 MiB, change 32 MiB-63 MiB.
  const layout = computeLayout(64 * MiB, 4096);
  const areaBytes = layout.blocks * layout.blockSize;

  test('the layout these cases assume', () => {
    expect(layout).toMatchObject({ mapOffset: 8192, mapPages: 1, dataOffset: MiB, changeOffset: 32 * MiB });
    expect(layout.changeOffset + areaBytes).toBe(63 * MiB);
  });

  test('in cldd metadata or in space cldd never writes, a signature is foreign', () => {
    const found = signaturesOverStore(layout, [
      sig('swap', 4086),
      sig('ext4', 1080),
      sig('btrfs', 65600),
      sig('zfs_member', 9000),
      sig('linux_raid_member', 64 * MiB - 8192),
    ]);
    expect(found.map((f) => [f.signature.type, f.area])).toEqual([
      ['swap', 'the superblocks'],
      ['ext4', 'the superblocks'],
      ['btrfs', 'the space before the data area'],
      ['zfs_member', 'the redirect map'],
      ['linux_raid_member', 'the space after the change area'],
    ]);
  });

  test("in the data or change area, a signature is the pair's own data", () => {
    const own = [
      sig('crypto_LUKS', layout.dataOffset),
      sig('linux_raid_member', layout.dataOffset + areaBytes - 65536),
      sig('linux_raid_member', layout.changeOffset + areaBytes - 8192),
    ];
    expect(signaturesOverStore(layout, own)).toEqual([]);
  });
});
