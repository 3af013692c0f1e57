import { connect, type Socket } from 'node:net';
import { CldError, isErrorCode } from '../errors.js';
import { checkResult, isPlainObject, type Method, type Params, REPLY_BOUND_MS, type Result } from './methods.js';
import { type HelloReply, LineReader, PROTOCOL_VERSION } from './protocol.js';

/** The CLI's end of a daemon's control socket. */
export class DaemonClient {
  private nextId = 1;
  private readonly waiting = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void }>();
  private closedError: Error | null = null;
  /** Calls whose reply came too late to be waited for: when it comes, it is dropped. */
  private readonly gaveUp = new Set<number>();

  private constructor(
    private readonly socket: Socket,
    readonly hello: HelloReply,
    private readonly name: string,
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
          const error = isPlainObject(value) ? value.error : undefined;
          if (error !== undefined) {
            socket.destroy();
            reject(replyError(error, name));
            return;
          }
          if (!isHelloReply(value)) {
            socket.destroy();
            reject(malformed(name, `a hello that is not {"hello":${PROTOCOL_VERSION},"pid":N,"name":S}`));
            return;
          }
          client = new DaemonClient(socket, value, name);
          socket.off('error', fail);
          const lost = () => client!.shutdown(new CldError('EPIPE', `the daemon of "${name}" closed the connection`));
          socket.on('error', lost);
          socket.on('close', lost);
          resolve();
          return;
        }
        client.receive(value);
      });
      socket.on('data', (chunk: string) => {
        try {
          reader.push(chunk);
        } catch (err) {
          const e = malformed(name, `a line that is not JSON (${(err as Error).message})`);
          if (client) client.shutdown(e);
          else {
            clearTimeout(timer);
            reject(e);
          }
          socket.destroy();
        }
      });
      socket.write(`${JSON.stringify({ hello: PROTOCOL_VERSION })}\n`);
    });
    return client!;
  }

  /** Calls a method of the daemon and checks the reply's shape: EPROTO when it is malformed. */
  async request<M extends Method>(method: M, ...params: {} extends Params<M> ? [Params<M>?] : [Params<M>]): Promise<Result<M>> {
    return checkResult(method, await this.call(method, (params[0] ?? {}) as Record<string, unknown>, REPLY_BOUND_MS[method]), this.name);
  }

  /** Calls any method; the result is whatever the daemon sent, within `timeoutMs`. */
  call<T = unknown>(method: string, params: Record<string, unknown> = {}, timeoutMs = 30_000): Promise<T> {
    if (this.closedError) return Promise.reject(this.closedError);
    const id = this.nextId++;
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiting.delete(id);
        this.gaveUp.add(id);
        reject(
          new CldError(
            'ETIMEDOUT',
            `the daemon of "${this.name}" did not answer ${method} (request ${id}) within ${timeoutMs / 1000} s; cldd status ${this.name} shows the requests its devices hold`,
          ),
        );
      }, timeoutMs);
      const settle =
        <V>(fn: (v: V) => void) =>
        (v: V) => {
          clearTimeout(timer);
          fn(v);
        };
      this.waiting.set(id, { resolve: settle(resolve as (v: unknown) => void), reject: settle(reject) });
      this.socket.write(`${JSON.stringify({ id, method, params })}\n`);
    });
  }

  close(): void {
    this.socket.end();
  }

  /** A reply has an id this client sent and exactly one of result and error. */
  private receive(reply: unknown): void {
    if (isPlainObject(reply) && typeof reply.id === 'number' && this.gaveUp.delete(reply.id)) return;
    const w = isPlainObject(reply) && typeof reply.id === 'number' ? this.waiting.get(reply.id) : undefined;
    if (!w || !isPlainObject(reply)) {
      // Not an answer to any call: a refusal of the connection (id 0), or garbage. Either way
      // no call can be answered any more.
      const error = isPlainObject(reply) ? reply.error : undefined;
      this.shutdown(error !== undefined ? replyError(error, this.name) : malformed(this.name, 'a reply to no request'));
      this.socket.destroy();
      return;
    }
    this.waiting.delete(reply.id as number);
    const hasResult = Object.prototype.hasOwnProperty.call(reply, 'result');
    if (reply.error !== undefined && !hasResult) w.reject(replyError(reply.error, this.name));
    else if (hasResult && reply.error === undefined) w.resolve(reply.result);
    else w.reject(malformed(this.name, 'a reply with neither or both of result and error'));
  }

  private shutdown(err: Error): void {
    this.closedError ??= err;
    for (const w of this.waiting.values()) w.reject(err);
    this.waiting.clear();
  }
}

function malformed(name: string, what: string): CldError {
  return new CldError('EPROTO', `the daemon of "${name}" sent ${what}`);
}

/**
 * The daemon's error as a CldError, its message kept (a code this CLI does not know, from a newer
 * daemon, reads as EIO); one without a string code and message is EPROTO.
 */
function replyError(error: unknown, name: string): CldError {
  if (isPlainObject(error) && typeof error.code === 'string' && typeof error.message === 'string') {
    return new CldError(isErrorCode(error.code) ? error.code : 'EIO', error.message);
  }
  return malformed(name, 'an error without a code and a message');
}

function isHelloReply(value: unknown): value is HelloReply {
  return isPlainObject(value) && value.hello === PROTOCOL_VERSION && Number.isSafeInteger(value.pid) && (value.pid as number) > 0 && typeof value.name === 'string';
}
