import { chmod, mkdir, rm } from 'node:fs/promises';
import { createServer, type Server, type Socket } from 'node:net';
import { dirname } from 'node:path';
import { codeOf } from '../errors.js';
import { isPlainObject } from '../protocol/methods.js';
import { isRequestId, LineReader, MAX_ID_LENGTH, PROTOCOL_VERSION, type ReplyMessage, type RequestId } from '../protocol/protocol.js';

export type Handler = (params: Record<string, unknown>) => Promise<unknown>;

/** The daemon's end of the control socket: root-only, one JSON request per line. */
export class ControlServer {
  private server: Server | null = null;
  private readonly sockets = new Set<Socket>();

  constructor(
    private readonly path: string,
    private readonly name: string,
    private readonly handlers: Record<string, Handler>,
  ) {}

  async listen(): Promise<void> {
    await mkdir(dirname(this.path), { recursive: true, mode: 0o700 });
    await rm(this.path, { force: true });
    const server = createServer((socket) => this.accept(socket));
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      // The socket is created with the umask applied; tighten it before anyone can connect.
      const old = process.umask(0o177);
      server.listen(this.path, () => {
        process.umask(old);
        resolve();
      });
    });
    await chmod(this.path, 0o600);
    this.server = server;
  }

  async close(): Promise<void> {
    const server = this.server;
    this.server = null;
    if (!server) return;
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((resolve) => server.close(() => resolve()));
    await rm(this.path, { force: true });
  }

  private accept(socket: Socket): void {
    this.sockets.add(socket);
    socket.setEncoding('utf8');
    let greeted = false;
    // Once the daemon has refused the connection, nothing more from it counts: not the rest of
    // the chunk being parsed (a client that sends its hello and its requests in one write), nor
    // anything that arrives before the close.
    let refused = false;
    // Backpressure: a client that sends requests without reading the replies must not make the
    // daemon buffer them without bound. While the socket's write buffer is full, or
    // MAX_IN_FLIGHT requests wait for their handlers, no more requests are read: the reader
    // holds what it has (one chunk at most) and the socket is paused, so the client's own
    // writes block in the kernel.
    let inFlight = 0;
    let writeFull = false;
    const blocked = () => writeFull || inFlight >= MAX_IN_FLIGHT;
    const holdIfBlocked = () => {
      if (!blocked()) return;
      reader.hold();
      socket.pause();
    };
    const resumeIfFree = () => {
      if (blocked() || refused || socket.destroyed) return;
      socket.resume();
      feed(() => reader.resume());
    };
    const send = (message: unknown) => {
      if (socket.destroyed || socket.writableEnded) return;
      if (!socket.write(`${JSON.stringify(message)}\n`)) {
        writeFull = true;
        holdIfBlocked();
      }
    };
    const refuse = (message: unknown) => {
      refused = true;
      send(message);
      socket.end();
    };
    const reader = new LineReader((value) => {
      if (refused) return;
      if (!greeted) {
        const version = isPlainObject(value) ? value.hello : undefined;
        if (version !== PROTOCOL_VERSION) {
          refuse({ id: 0, error: { code: 'CLDD_VERSION', message: helloRefusal(version) } });
          return;
        }
        greeted = true;
        send({ hello: PROTOCOL_VERSION, pid: process.pid, name: this.name });
        return;
      }
      inFlight++;
      holdIfBlocked();
      void this.dispatch(value).then((reply) => {
        inFlight--;
        send(reply);
        resumeIfFree();
      });
    });
    const feed = (step: () => void) => {
      try {
        step();
      } catch (err) {
        // Lines before the bad one were handled; nothing after it is.
        refuse({ id: 0, error: { code: 'EINVAL', message: `bad request: ${(err as Error).message}` } });
      }
    };
    socket.on('data', (chunk: string) => {
      if (!refused) feed(() => reader.push(chunk));
    });
    socket.on('drain', () => {
      writeFull = false;
      resumeIfFree();
    });
    socket.on('error', () => socket.destroy());
    socket.on('close', () => this.sockets.delete(socket));
  }

  private async dispatch(req: unknown): Promise<ReplyMessage> {
    const refuse = (id: RequestId, message: string): ReplyMessage => ({ id, error: { code: 'EINVAL', message } });
    if (!isPlainObject(req)) return refuse(0, 'a request must be an object {"id", "method", "params"}');
    const { id, method, params } = req;
    if (!isRequestId(id)) {
      return refuse(0, `a request's id must be a whole number or a string of up to ${MAX_ID_LENGTH} characters, not ${quote(id)}`);
    }
    const handler = typeof method === 'string' && Object.prototype.hasOwnProperty.call(this.handlers, method) ? this.handlers[method] : undefined;
    if (!handler) return refuse(id, `unknown method ${quote(method)}`);
    if (params !== undefined && !isPlainObject(params)) return refuse(id, `${method}: params must be an object, not ${quote(params)}`);
    try {
      // A handler with nothing to say still answers with a result: a reply has a result or an error.
      return { id, result: (await handler(params ?? {})) ?? null };
    } catch (err) {
      // A code the CLI knows (an errno name or CLDD_*): anything else, a Node internal code, is EIO.
      return { id, error: { code: codeOf(err), message: err instanceof Error ? err.message : String(err) } };
    }
  }
}

/** Requests one connection may have waiting for their handlers before the daemon stops reading it. */
export const MAX_IN_FLIGHT = 32;

/** A value from a request, for a message: JSON, cut short. */
function quote(value: unknown): string {
  // JSON would say null for an id of 1e400 (Infinity).
  const json = value === undefined ? 'nothing' : typeof value === 'number' ? String(value) : (JSON.stringify(value) ?? String(value));
  return json.length > 80 ? `${json.slice(0, 77)}...` : json;
}

function helloRefusal(version: unknown): string {
  if (typeof version === 'number') return `the daemon speaks protocol ${PROTOCOL_VERSION}, the client ${version}`;
  const hello = `{"hello":${PROTOCOL_VERSION}}`;
  if (version === undefined) return `the daemon speaks protocol ${PROTOCOL_VERSION}: the first message must be ${hello}`;
  return `the daemon speaks protocol ${PROTOCOL_VERSION}: the hello must be ${hello}, with the number ${PROTOCOL_VERSION}, not ${quote(version)}`;
}
