import { connect, type Socket } from 'node:net';
import { CldError } from '../errors.js';
import { type HelloReply, LineReader, PROTOCOL_VERSION, type ReplyMessage } from './protocol.js';

/** The CLI's end of a daemon's control socket. */
export class DaemonClient {
  private nextId = 1;
  private readonly waiting = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void }>();
  private closedError: Error | null = null;

  private constructor(
    private readonly socket: Socket,
    readonly hello: HelloReply,
  ) {}

  /** Connects and shakes hands. ENOENT/ECONNREFUSED mean no daemon serves that pair. */
  static async connect(path: string, name: string, timeoutMs = 5000): Promise<DaemonClient> {
    const socket = connect(path);
    socket.setEncoding('utf8');
    let client: DaemonClient | null = null;
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        socket.destroy();
        reject(new CldError('ETIMEDOUT', `the daemon of "${name}" did not answer within ${timeoutMs} ms`));
      }, timeoutMs);
      const fail = (err: Error) => {
        clearTimeout(timer);
        const code = (err as { code?: string }).code;
        if (code === 'ENOENT' || code === 'ECONNREFUSED') {
          reject(new CldError('ENOENT', `no pair named "${name}" is running`));
        } else if (code === 'EACCES') {
          reject(new CldError('EACCES', `permission denied on ${path} (are you root?)`));
        } else reject(err);
      };
      socket.once('error', fail);
      const reader = new LineReader((value) => {
        if (!client) {
          clearTimeout(timer);
          const v = value as Partial<HelloReply> & ReplyMessage;
          if (v.error) {
            socket.destroy();
            reject(new CldError(v.error.code, v.error.message));
            return;
          }
          client = new DaemonClient(socket, v as HelloReply);
          socket.off('error', fail);
          const lost = () => client!.shutdown(new CldError('EPIPE', `the daemon of "${name}" closed the connection`));
          socket.on('error', lost);
          socket.on('close', lost);
          resolve();
          return;
        }
        client.receive(value as ReplyMessage);
      });
      socket.on('data', (chunk: string) => reader.push(chunk));
      socket.write(`${JSON.stringify({ hello: PROTOCOL_VERSION })}\n`);
    });
    return client!;
  }

  call<T = unknown>(method: string, params: Record<string, unknown> = {}): Promise<T> {
    if (this.closedError) return Promise.reject(this.closedError);
    const id = this.nextId++;
    return new Promise<T>((resolve, reject) => {
      this.waiting.set(id, { resolve: resolve as (v: unknown) => void, reject });
      this.socket.write(`${JSON.stringify({ id, method, params })}\n`);
    });
  }

  close(): void {
    this.socket.end();
  }

  private receive(reply: ReplyMessage): void {
    const w = this.waiting.get(reply.id);
    if (!w) return;
    this.waiting.delete(reply.id);
    if (reply.error) w.reject(new CldError(reply.error.code, reply.error.message));
    else w.resolve(reply.result);
  }

  private shutdown(err: Error): void {
    this.closedError ??= err;
    for (const w of this.waiting.values()) w.reject(err);
    this.waiting.clear();
  }
}
