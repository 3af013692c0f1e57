import { chmod, mkdir, rm } from 'node:fs/promises';
import { createServer, type Server, type Socket } from 'node:net';
import { dirname } from 'node:path';
import { CldError } from '../errors.js';
import { LineReader, PROTOCOL_VERSION, type ReplyMessage, type RequestMessage } from './protocol.js';

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
    const send = (message: unknown) => {
      if (!socket.destroyed && !socket.writableEnded) socket.write(`${JSON.stringify(message)}\n`);
    };
    const refuse = (message: unknown) => {
      refused = true;
      send(message);
      socket.end();
    };
    const reader = new LineReader((value) => {
      if (refused) return;
      if (!greeted) {
        const version = (value as { hello?: unknown })?.hello;
        if (version !== PROTOCOL_VERSION) {
          refuse({ id: 0, error: { code: 'CLDD_VERSION', message: `the daemon speaks protocol ${PROTOCOL_VERSION}, the client ${String(version)}` } });
          return;
        }
        greeted = true;
        send({ hello: PROTOCOL_VERSION, pid: process.pid, name: this.name });
        return;
      }
      const req = value as RequestMessage;
      void this.dispatch(req).then(send);
    });
    socket.on('data', (chunk: string) => {
      if (refused) return;
      try {
        reader.push(chunk);
      } catch (err) {
        // Lines before the bad one were handled; nothing after it is.
        refuse({ id: 0, error: { code: 'EINVAL', message: `bad request: ${(err as Error).message}` } });
      }
    });
    socket.on('error', () => socket.destroy());
    socket.on('close', () => this.sockets.delete(socket));
  }

  private async dispatch(req: RequestMessage): Promise<ReplyMessage> {
    const id = typeof req?.id === 'number' ? req.id : 0;
    const handler = typeof req?.method === 'string' ? this.handlers[req.method] : undefined;
    if (!handler || !Object.prototype.hasOwnProperty.call(this.handlers, req.method)) {
      return { id, error: { code: 'EINVAL', message: `unknown method ${JSON.stringify(req?.method)}` } };
    }
    try {
      return { id, result: await handler(req.params ?? {}) };
    } catch (err) {
      const code = err instanceof CldError ? err.code : ((err as { code?: string })?.code ?? 'EIO');
      return { id, error: { code, message: err instanceof Error ? err.message : String(err) } };
    }
  }
}
