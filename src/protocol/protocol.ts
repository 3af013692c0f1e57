/**
 * The CLI talks to a pair's daemon over a root-only unix socket with newline-delimited JSON.
 * The client opens with {"hello": PROTOCOL_VERSION}; the daemon answers
 * {"hello": PROTOCOL_VERSION, "pid": ..., "name": ...} or an error with code CLDD_VERSION and
 * closes. Then each request {"id", "method", "params"} gets one reply {"id", "result"} or
 * {"id", "error": {"code", "message"}}, in any order. The id is a safe integer or a string of up
 * to MAX_ID_LENGTH characters; params, when present, an object that methods.ts checks for each
 * method. A line that is no such request is refused with id 0 (EINVAL). A connection is read no
 * faster than it reads its replies.
 */
export const PROTOCOL_VERSION = 1;

export interface Hello {
  hello: number;
}

export interface HelloReply {
  hello: number;
  pid: number;
  name: string;
}

export interface RequestMessage {
  /** A safe integer or a string of up to MAX_ID_LENGTH characters, echoed in the reply. */
  id: RequestId;
  method: string;
  params?: Record<string, unknown>;
}

export type RequestId = number | string;
export const MAX_ID_LENGTH = 64;

export const isRequestId = (id: unknown): id is RequestId =>
  (typeof id === 'number' && Number.isSafeInteger(id)) || (typeof id === 'string' && id.length <= MAX_ID_LENGTH);

/** Exactly one of result and error. */
export interface ReplyMessage {
  id: RequestId;
  result?: unknown;
  error?: { code: string; message: string };
}

/**
 * Splits a byte stream into JSON lines; rejects a line over `limit` bytes. While held it hands
 * out no lines: what was received stays queued until resume(), so a reader that stops its
 * socket too (pause) holds at most one chunk more.
 */
export class LineReader {
  private pending = '';
  private held = false;

  constructor(
    private readonly onLine: (value: unknown) => void,
    private readonly limit = 1 << 20,
  ) {}

  push(chunk: string): void {
    this.pending += chunk;
    this.drain();
  }

  hold(): void {
    this.held = true;
  }

  resume(): void {
    this.held = false;
    this.drain();
  }

  private drain(): void {
    while (!this.held) {
      const nl = this.pending.indexOf('\n');
      if (nl < 0) break;
      const line = this.pending.slice(0, nl);
      this.pending = this.pending.slice(nl + 1);
      if (line.trim()) this.onLine(JSON.parse(line));
    }
    // Only the line still incomplete counts: complete ones may wait while held.
    if (this.pending.length - this.pending.lastIndexOf('\n') - 1 > this.limit) throw new Error('message too long');
  }
}
