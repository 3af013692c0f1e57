/**
 * Copies a slave image, or the extents of it that changed, into a backup TARGET, and keeps the
 * image's digest: the sum mod 2^256 of SHA-256(region number as u64 LE || region bytes) over its
 * 64 KiB regions. A sum, so an incremental copy updates it from the regions it rewrites (their
 * old terms out, their new ones in) without reading the rest of the image.
 */
import { createHash } from 'node:crypto';
import { open, type FileHandle } from 'node:fs/promises';
import { CldError, ioError } from '../errors.js';

export const REGION = 65536;
const PIECE = 1 << 20;
const MOD = 1n << 256n;

export type Extent = [number, number];

export interface CopyProgress {
  /** Bytes of the extents to copy done so far, and in all. */
  done: number;
  total: number;
}

export interface CopyOptions {
  /** The slave (or any image of `size` bytes). */
  source: string;
  target: string;
  targetIsBlockDevice: boolean;
  size: number;
  /** The extents to copy over an image whose digest is `baseDigest`; null: the whole image. */
  extents: Extent[] | null;
  baseDigest?: string;
  /** At most this many bytes per second read from the source; null or absent: as fast as it goes. */
  rate?: number | null;
  onProgress?: (p: CopyProgress) => void;
}

export interface CopyResult {
  digest: string;
  /** Bytes read from the source and written (a full copy of a file skips zero regions). */
  bytesCopied: number;
  bytesWritten: number;
  extents: number;
}

function term(region: number, data: Uint8Array): bigint {
  const index = Buffer.alloc(8);
  index.writeBigUInt64LE(BigInt(region));
  return BigInt(`0x${createHash('sha256').update(index).update(data).digest('hex')}`);
}

const hex = (n: bigint) => n.toString(16).padStart(64, '0');

async function readFully(fh: FileHandle, buf: Buffer, length: number, position: number, what: string): Promise<void> {
  let got = 0;
  while (got < length) {
    let n: number;
    try {
      ({ bytesRead: n } = await fh.read(buf, got, length - got, position + got));
    } catch (err) {
      throw ioError(`read ${what} at ${position + got}`, err);
    }
    if (n === 0) throw new CldError('EIO', `${what} ends at ${position + got}, before ${position + length}`);
    got += n;
  }
}

async function writeFully(fh: FileHandle, buf: Buffer, offset: number, length: number, position: number, what: string): Promise<void> {
  let put = 0;
  while (put < length) {
    try {
      const { bytesWritten } = await fh.write(buf, offset + put, length - put, position + put);
      put += bytesWritten;
    } catch (err) {
      throw ioError(`write ${what} at ${position + put}`, err);
    }
  }
}

const isZero = (buf: Buffer, start: number, end: number) => {
  for (let i = start; i < end; i++) if (buf[i] !== 0) return false;
  return true;
};

/** Copies and syncs TARGET; the data is durable when this returns. */
export async function copyImage(o: CopyOptions): Promise<CopyResult> {
  const full = o.extents === null;
  const extents: Extent[] = o.extents ?? (o.size > 0 ? [[0, o.size]] : []);
  for (const [offset, length] of extents) {
    if (offset % REGION !== 0 || (length % REGION !== 0 && offset + length !== o.size) || offset + length > o.size) {
      throw new CldError('EINVAL', `extent [${offset}, ${length}] is not made of whole 64 KiB regions of the image`);
    }
  }
  const total = extents.reduce((n, [, l]) => n + l, 0);
  let sum = full ? 0n : BigInt(`0x${o.baseDigest ?? ''}`);
  const source = await open(o.source, 'r').catch((err) => {
    throw ioError(`open ${o.source}`, err);
  });
  let target: FileHandle | null = null;
  try {
    // A file copied in full starts empty, so the regions it skips (zero) stay holes.
    const sparse = full && !o.targetIsBlockDevice;
    target = await open(o.target, sparse ? 'w' : 'r+').catch((err) => {
      throw ioError(`open ${o.target}`, err);
    });
    if (sparse) {
      await target.truncate(o.size).catch((err) => {
        throw ioError(`make ${o.target} ${o.size} bytes long`, err);
      });
    }
    const data = Buffer.alloc(PIECE);
    const old = Buffer.alloc(PIECE);
    let done = 0;
    let written = 0;
    const started = performance.now();
    for (const [offset, length] of extents) {
      for (let at = offset; at < offset + length; at += PIECE) {
        const n = Math.min(PIECE, offset + length - at);
        // Paced: the next piece waits until the bytes so far fit the rate.
        if (o.rate) {
          const ahead = (done / o.rate) * 1000 - (performance.now() - started);
          if (ahead > 0) await new Promise((resolve) => setTimeout(resolve, ahead));
        }
        await readFully(source, data, n, at, o.source);
        if (!full) await readFully(target, old, n, at, o.target);
        let runStart = -1;
        for (let r = 0; r < n; r += REGION) {
          const end = Math.min(n, r + REGION);
          const region = (at + r) / REGION;
          if (!full) sum -= term(region, old.subarray(r, end));
          sum += term(region, data.subarray(r, end));
          const skip = sparse && isZero(data, r, end);
          if (!skip && runStart < 0) runStart = r;
          if ((skip || end === n) && runStart >= 0) {
            const stop = skip ? r : end;
            await writeFully(target, data, runStart, stop - runStart, at + runStart, o.target);
            written += stop - runStart;
            runStart = -1;
          }
        }
        done += n;
        o.onProgress?.({ done, total });
      }
    }
    try {
      await target.sync();
    } catch (err) {
      throw ioError(`sync ${o.target}`, err);
    }
    sum = ((sum % MOD) + MOD) % MOD;
    return { digest: hex(sum), bytesCopied: total, bytesWritten: written, extents: extents.length };
  } finally {
    await target?.close();
    await source.close();
  }
}

/**
 * Reads TARGET and the source in full, compares them byte for byte and recomputes TARGET's
 * digest: a mismatch anywhere (a bad copy, or a TARGET changed since an earlier backup) is EIO.
 */
export async function verifyImage(o: { source: string; target: string; size: number; digest: string; onProgress?: (p: CopyProgress) => void }): Promise<void> {
  const source = await open(o.source, 'r');
  const target = await open(o.target, 'r');
  try {
    const a = Buffer.alloc(PIECE);
    const b = Buffer.alloc(PIECE);
    let sum = 0n;
    for (let at = 0; at < o.size; at += PIECE) {
      const n = Math.min(PIECE, o.size - at);
      await readFully(source, a, n, at, o.source);
      await readFully(target, b, n, at, o.target);
      if (!a.subarray(0, n).equals(b.subarray(0, n))) {
        let i = 0;
        while (a[i] === b[i]) i++;
        throw new CldError('EIO', `verify: ${o.target} differs from the slave at byte ${at + i}`);
      }
      for (let r = 0; r < n; r += REGION) sum += term((at + r) / REGION, b.subarray(r, Math.min(n, r + REGION)));
      o.onProgress?.({ done: at + n, total: o.size });
    }
    const digest = hex(sum % MOD);
    if (digest !== o.digest) throw new CldError('EIO', `verify: the digest of ${o.target} is ${digest}, the record says ${o.digest}`);
  } finally {
    await target.close();
    await source.close();
  }
}

/** The digest of an image file, as copyImage keeps it (tests, and checking a TARGET by hand). */
export async function imageDigest(path: string, size: number): Promise<string> {
  const fh = await open(path, 'r');
  try {
    const buf = Buffer.alloc(PIECE);
    let sum = 0n;
    for (let at = 0; at < size; at += PIECE) {
      const n = Math.min(PIECE, size - at);
      await readFully(fh, buf, n, at, path);
      for (let r = 0; r < n; r += REGION) sum += term((at + r) / REGION, buf.subarray(r, Math.min(n, r + REGION)));
    }
    return hex(sum % MOD);
  } finally {
    await fh.close();
  }
}
