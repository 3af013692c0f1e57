/**
 * The CLI talks to a pair's daemon over a root-only unix socket with newline-delimited JSON.
 * The client opens with {"hello": PROTOCOL_VERSION}; the daemon answers
 * {"hello": PROTOCOL_VERSION, "pid": ..., "name": ...} or an error with code CLDD_VERSION and
 * closes. Then each request {"id", "method", "params"} gets one reply {"id", "result"} or
 * {"id", "error": {"code", "message"}}, in any order.
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
  id: number;
  method: string;
  params?: Record<string, unknown>;
}

export interface ReplyMessage {
  id: number;
  result?: unknown;
  error?: { code: string; message: string };
}

/** Splits a byte stream into JSON lines; rejects lines over `limit` bytes. */
export class LineReader {
  private pending = '';

  constructor(
    private readonly onLine: (value: unknown) => void,
    private readonly limit = 1 << 20,
  ) {}

  push(chunk: string): void {
    this.pending += chunk;
    for (;;) {
      const nl = this.pending.indexOf('\n');
      if (nl < 0) break;
      const line = this.pending.slice(0, nl);
      this.pending = this.pending.slice(nl + 1);
      if (line.trim()) this.onLine(JSON.parse(line));
    }
    if (this.pending.length > this.limit) throw new Error('message too long');
  }
}
