/**
 * Where a request's blocks are: the checks every request passes before it is planned, and the
 * extents of the backing store its blocks map to (the data area, or the change area for blocks
 * the map redirects). Pure functions of the layout, the state and the map.
 */
import { CldError } from '../errors.js';
import type { Layout, VolumeState } from '../format/format.js';
import type { BlockMap } from './block-map.js';
import type { IoOp, Request } from './plan.js';

/** Refuses a request no state can serve: misaligned, out of range, or for a slave not there. */
export function checkRequest(req: Request, layout: Layout, state: VolumeState): void {
  const { blockSize, blocks } = layout;
  if (req.op === 'flush') {
    if (req.target !== 'master' && state !== 'snapshot') throw noSlave();
    return;
  }
  if (
    !Number.isSafeInteger(req.offset) ||
    !Number.isSafeInteger(req.length) ||
    req.offset < 0 ||
    req.length <= 0 ||
    req.offset % blockSize !== 0 ||
    req.length % blockSize !== 0
  ) {
    throw new CldError('EINVAL', `${req.op} of ${req.length} bytes at ${req.offset}: offset and length must be positive multiples of the block size ${blockSize}`);
  }
  if (req.offset + req.length > blocks * blockSize) {
    throw new CldError('EINVAL', `${req.op} of ${req.length} bytes at ${req.offset} runs past the end (${blocks * blockSize} bytes)`);
  }
  if (req.target === 'slave') {
    if (state !== 'snapshot') throw noSlave();
    if (req.op !== 'read') throw new CldError('EROFS', 'the slave is read-only');
  }
}

function noSlave(): CldError {
  return new CldError('ENODEV', 'the slave is not enabled');
}

/** Blocks [start, end) of an area as one op; `bufferOffset` is where they sit in the request. */
export function extent(layout: Layout, kind: IoOp['kind'], area: 'data' | 'change', start: number, end: number, bufferOffset: number): IoOp {
  const base = area === 'data' ? layout.dataOffset : layout.changeOffset;
  const bs = layout.blockSize;
  return { kind, offset: base + start * bs, length: (end - start) * bs, bufferOffset: kind === 'zero' ? 0 : bufferOffset };
}

/** A master read of [start, end): one op per run of blocks the map redirects or not. */
export function masterReadExtents(layout: Layout, map: BlockMap, start: number, end: number): IoOp[] {
  const ops: IoOp[] = [];
  map.forEachRun(start, end, (s, e, redirected) => {
    ops.push(extent(layout, 'read', redirected ? 'change' : 'data', s, e, (s - start) * layout.blockSize));
  });
  return ops;
}

export function allRedirected(map: BlockMap, start: number, end: number): boolean {
  for (let b = start; b < end; b++) if (!map.test(b)) return false;
  return true;
}

export function noneRedirected(map: BlockMap, start: number, end: number): boolean {
  if (map.count === 0) return true;
  for (let b = start; b < end; b++) if (map.test(b)) return false;
  return true;
}
