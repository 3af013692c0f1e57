import { mkdtemp, rm, stat } from 'node:fs/promises';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, test } from 'vitest';
import { DaemonClient } from '../src/protocol/client.js';
import { ControlServer, MAX_IN_FLIGHT } from '../src/daemon/control-server.js';
import { checkedHandlers, checkReadyLine } from '../src/protocol/methods.js';
import { checkName } from '../src/protocol/paths.js';
import { within } from '../src/deadline.js';
import { CldError } from '../src/errors.js';


/** How long a helper below waits for the daemon's replies: each comes in milliseconds here. */
const REPLY_WAIT_MS = 10_000;

/** Sends `text` in one write; resolves with everything the daemon sent until it closed. */
function exchangeAt(path: string, text: string): Promise<string> {
  let reply = '';
  const socket = connect(path);
  socket.setEncoding('utf8');
  const closed = new Promise<string>((resolve) => {
    socket.on('data', (d: string) => (reply += d));
    socket.on('close', () => resolve(reply));
    socket.on('error', () => {});
    socket.write(text);
  });
  return within(closed, REPLY_WAIT_MS, () => {
    socket.destroy();
    return new Error(`the daemon did not close the connection within ${REPLY_WAIT_MS} ms of ${JSON.stringify(text.slice(0, 80))}; it sent ${JSON.stringify(reply.slice(0, 200))}`);
  });
}

describe('control socket', () => {
  let dir: string;
  let server: ControlServer;
  let path: string;

  let enabled: number;
  /** Answers the pending `hold` call; `held` resolves once the server has it. */
  let release: (value: unknown) => void = () => {};
  let held: Promise<void> = Promise.resolve();
  let entered: () => void = () => {};

  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), 'cldd-control-'));
    path = join(dir, 'run', 'pair.sock');
    enabled = 0;
    server = new ControlServer(path, 'pair', {
      enable: async () => ++enabled,
      echo: async (params) => params,
      fail: async () => {
        throw new CldError('CLDD_STATE', 'the slave is not enabled');
      },
      slow: async (params) => new Promise((resolve) => setTimeout(() => resolve(params.n), Number(params.ms))),
      hold: async () =>
        new Promise((resolve) => {
          release = resolve;
          entered();
        }),
    });
    await server.listen();
  });

  afterEach(async () => {
    await server.close();
    await rm(dir, { recursive: true, force: true });
  });

  test('the socket is root-only', async () => {
    expect((await stat(path)).mode & 0o777).toBe(0o600);
  });

  test('handshake, replies, errors with codes, out-of-order replies', async () => {
    const client = await DaemonClient.connect(path, 'pair');
    expect(client.hello).toMatchObject({ hello: 1, pid: process.pid, name: 'pair' });
    expect(await client.call('echo', { a: 1 })).toEqual({ a: 1 });
    await expect(client.call('fail')).rejects.toMatchObject({ code: 'CLDD_STATE', message: 'the slave is not enabled' });
    await expect(client.call('nope')).rejects.toMatchObject({ code: 'EINVAL' });
    await expect(client.call('hasOwnProperty')).rejects.toMatchObject({ code: 'EINVAL' });
    const order: number[] = [];
    await Promise.all([
      client.call('slow', { n: 1, ms: 50 }).then((n) => order.push(n as number)),
      client.call('slow', { n: 2, ms: 1 }).then((n) => order.push(n as number)),
    ]);
    expect(order).toEqual([2, 1]);
    client.close();
  });

  test('a reply that does not come in time fails the call saying which; one that comes later is dropped', async () => {
    const client = await DaemonClient.connect(path, 'pair');
    held = new Promise((resolve) => (entered = resolve));
    const call = client.call('hold', {}, 50);
    await expect(call).rejects.toMatchObject({
      code: 'ETIMEDOUT',
      message: 'the daemon of "pair" did not answer hold (request 1) within 0.05 s; cldd status pair shows the requests its devices hold',
    });
    // The server has the call (waited for, not hoped for): its reply comes now, too late.
    await within(held, 5000, () => new Error('the server did not get the hold call within 5 s'));
    release('late');
    // The late reply reaches the client before this one: it is dropped, the connection stays.
    expect(await client.call('echo', { b: 2 })).toEqual({ b: 2 });
    client.close();
  });

  test('a client speaking another protocol version is refused with CLDD_VERSION', async () => {
    const reply = await exchange('{"hello": 99}\n');
    expect(JSON.parse(reply)).toMatchObject({ error: { code: 'CLDD_VERSION' } });
  });

  const exchange = (text: string) => exchangeAt(path, text);

  test('after refusing a protocol version, the daemon ignores the rest of the write and closes', async () => {
    const reply = await exchange('{"hello":2}\n{"hello":1}\n{"id":5,"method":"enable"}\n');
    expect(reply.trim().split('\n').map((l) => JSON.parse(l))).toEqual([
      { id: 0, error: { code: 'CLDD_VERSION', message: 'the daemon speaks protocol 1, the client 2' } },
    ]);
    expect(enabled).toBe(0);
  });

  test('after a line that is not JSON, nothing later in the write is served', async () => {
    const reply = await exchange('{"hello":1}\nnot json\n{"id":5,"method":"enable"}\n');
    const lines = reply.trim().split('\n').map((l) => JSON.parse(l));
    expect(lines).toHaveLength(2);
    expect(lines[0]).toMatchObject({ hello: 1 });
    expect(lines[1]).toMatchObject({ id: 0, error: { code: 'EINVAL' } });
    expect(enabled).toBe(0);
  });

  test('no daemon: a clear error naming the pair', async () => {
    await expect(DaemonClient.connect(join(dir, 'other.sock'), 'other')).rejects.toMatchObject({
      code: 'ENOENT',
      message: 'no pair named "other" is running',
    });
  });

  test('in-flight calls fail when the daemon goes away', async () => {
    const client = await DaemonClient.connect(path, 'pair');
    const outcome = expect(client.call('slow', { n: 1, ms: 10_000 })).rejects.toMatchObject({ code: 'EPIPE' });
    await server.close();
    await outcome;
  });
});

test('pair names are checked', () => {
  expect(checkName('backup-1')).toBe('backup-1');
  for (const bad of ['', 'Upper', '../x', 'a b', '-lead', 'x'.repeat(33)]) {
    expect(() => checkName(bad)).toThrow(/not a valid pair name/);
  }
});

describe('control socket: what a request may be', () => {
  let dir: string;
  let path: string;
  let server: ControlServer;
  /** The params each handler of the daemon's methods was called with. */
  let calls: [string, unknown][];

  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), 'cldd-control-'));
    path = join(dir, 'pair.sock');
    calls = [];
    const record =
      <T>(method: string, result: T) =>
      async (params: unknown) => {
        calls.push([method, params]);
        return result;
      };
    const progress = { state: 'plain', running: false, blocksLeft: 0, blocksMerged: 0, rate: 0, secondsLeft: 0, error: null };
    server = new ControlServer(path, 'pair', {
      ...checkedHandlers({
        status: async () => {
          throw new Error('not in this test');
        },
        requests: record('requests', { devices: [] }),
        enable: record('enable', { epoch: 1, frozen: null, frozenMs: null }),
        disable: record('disable', { state: 'resync', blocks: 0 }),
        progress: record('progress', progress),
        changes: async () => {
          throw new Error('not in this test');
        },
        'resync-rate': async (p) => {
          calls.push(['resync-rate', p]);
          return { bytesPerSecond: p.bytesPerSecond };
        },
        stop: record('stop', { stopping: true as const }),
      }),
      nothing: async () => undefined,
    });
    await server.listen();
  });

  afterEach(async () => {
    await server.close();
    await rm(dir, { recursive: true, force: true });
  });

  /** Sends the hello and `requests` (one per line); resolves with the replies, in the order of their numeric ids. */
  const ask = (requests: string[]) => {
    let text = '';
    const socket = connect(path);
    socket.setEncoding('utf8');
    const replies = new Promise<Record<string, unknown>[]>((resolve, reject) => {
      socket.on('data', (d: string) => {
        text += d;
        const lines = text.split('\n').filter(Boolean);
        if (lines.length === requests.length + 1) {
          socket.destroy();
          const replies = lines.slice(1).map((l) => JSON.parse(l) as Record<string, unknown>);
          resolve(replies.sort((a, b) => (typeof a.id === 'number' && typeof b.id === 'number' ? a.id - b.id : 0)));
        }
      });
      socket.on('error', reject);
      socket.write(`{"hello":1}\n${requests.map((r) => `${r}\n`).join('')}`);
    });
    return within(replies, REPLY_WAIT_MS, () => {
      socket.destroy();
      const got = text.split('\n').filter(Boolean).length;
      return new Error(`${got} of ${requests.length + 1} lines (the hello and a reply per request) within ${REPLY_WAIT_MS} ms of ${requests.join(' ')}`);
    });
  };

  const request = (id: number | string, method: string, params?: unknown) => JSON.stringify({ id, method, params });

  test('resync-rate takes a whole number of bytes per second in range; anything else is EINVAL and changes nothing', async () => {
    const bad: unknown[] = [
      { bytesPerSecond: 'abc' },
      { bytesPerSecond: -5 },
      { bytesPerSecond: 1e-300 },
      { bytesPerSecond: 1.5 },
      { bytesPerSecond: 2 ** 53 },
      { bytesPerSecond: null },
      { bytesPerSecond: true },
      {},
      { bytesPerSecond: 5, extra: 1 },
      5,
      'x',
      [1],
      null,
    ];
    const replies = await ask(bad.map((params, i) => request(i + 1, 'resync-rate', params)));
    replies.forEach((reply, i) => {
      expect(reply, JSON.stringify(bad[i])).toMatchObject({ id: i + 1, error: { code: 'EINVAL' } });
      expect(reply).not.toHaveProperty('result');
    });
    expect(replies[0].error).toMatchObject({ message: `resync-rate: params.bytesPerSecond must be a whole number from 0 to ${Number.MAX_SAFE_INTEGER}` });
    expect(calls).toEqual([]);
    const [zero, limit] = await ask([request(20, 'resync-rate', { bytesPerSecond: 0 }), request(21, 'resync-rate', { bytesPerSecond: 1 << 20 })]);
    expect(zero).toEqual({ id: 20, result: { bytesPerSecond: 0 } });
    expect(limit).toEqual({ id: 21, result: { bytesPerSecond: 1 << 20 } });
    expect(calls).toEqual([
      ['resync-rate', { bytesPerSecond: 0 }],
      ['resync-rate', { bytesPerSecond: 1 << 20 }],
    ]);
  });

  test("every method's params are checked before its handler runs: wrong types, unknown members and non-objects are EINVAL", async () => {
    const bad: [string, unknown][] = [
      ['enable', [1]],
      ['enable', { wait: 'no' }],
      ['enable', { wait: 1 }],
      ['enable', { freeze: 1 }],
      ['enable', { noFreeze: 'yes' }],
      ['enable', { wiat: true }],
      ['stop', { force: 'yes' }],
      ['stop', 'force'],
      ['disable', { force: true }],
      ['progress', [1]],
      ['requests', 0],
      ['nothing', 'x'],
    ];
    const replies = await ask(bad.map(([method, params], i) => request(i + 1, method, params)));
    replies.forEach((reply, i) => {
      expect(reply, JSON.stringify(bad[i])).toEqual({ id: i + 1, error: { code: 'EINVAL', message: expect.stringMatching(new RegExp(`^${bad[i][0]}: params`)) } });
    });
    expect(calls).toEqual([]);
    const good = await ask([
      request(1, 'enable', { wait: false, freeze: '', noFreeze: true }),
      request(2, 'enable'),
      request(3, 'stop', { force: true }),
      request(4, 'disable', {}),
      request(5, 'progress'),
    ]);
    expect(good.map((r) => Object.keys(r).sort())).toEqual(Array(5).fill(['id', 'result']));
    expect(calls).toEqual([
      ['enable', { wait: false, freeze: '', noFreeze: true }],
      ['enable', {}],
      ['stop', { force: true }],
      ['disable', {}],
      ['progress', {}],
    ]);
  });

  test('every reply has exactly one of result and error, even from a handler that returns nothing', async () => {
    expect(await ask([request(7, 'nothing')])).toEqual([{ id: 7, result: null }]);
  });

  test('an id is a safe integer or a short string; any other is refused, with id 0', async () => {
    const replies = await ask([
      '{"id":1e400,"method":"progress"}',
      '{"id":1.5,"method":"progress"}',
      '{"id":{"a":1},"method":"progress"}',
      `{"id":"${'x'.repeat(65)}","method":"progress"}`,
      '{"method":"progress"}',
      '[1,2]',
      '"str"',
      'null',
      '{"id":"x","method":"progress"}',
      `{"id":${Number.MAX_SAFE_INTEGER},"method":"progress"}`,
    ]);
    const refused = replies.filter((r) => r.id === 0);
    expect(refused).toHaveLength(8);
    for (const reply of refused) expect(reply).toMatchObject({ error: { code: 'EINVAL' } });
    expect(refused.map((r) => (r.error as { message: string }).message)).toContain(
      "a request's id must be a whole number or a string of up to 64 characters, not Infinity",
    );
    expect(replies.find((r) => r.id === 'x')).toMatchObject({ result: { state: 'plain' } });
    expect(replies.find((r) => r.id === Number.MAX_SAFE_INTEGER)).toMatchObject({ result: { state: 'plain' } });
    expect(calls).toHaveLength(2);
  });

  test('a hello with the version as a string is refused, saying the version must be the number', async () => {
    const reply = await exchangeAt(path, '{"hello":"1"}\n{"id":1,"method":"progress"}\n');
    expect(JSON.parse(reply)).toEqual({
      id: 0,
      error: { code: 'CLDD_VERSION', message: 'the daemon speaks protocol 1: the hello must be {"hello":1}, with the number 1, not "1"' },
    });
    expect(calls).toEqual([]);
  });
});

describe('control socket: a client that does not read its replies', () => {
  let dir: string;
  let path: string;
  let server: ControlServer;
  let served: number;
  let release: () => void;
  let released: Promise<void>;

  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), 'cldd-control-'));
    path = join(dir, 'pair.sock');
    served = 0;
    released = new Promise((resolve) => (release = resolve));
    // A status-sized answer (about 1 KiB), so that replies fill the socket's buffers quickly.
    const status = { text: 'x'.repeat(1000) };
    server = new ControlServer(path, 'pair', {
      status: async () => (served++, status),
      held: async () => {
        served++;
        await released;
        return null;
      },
    });
    await server.listen();
  });

  afterEach(async () => {
    release();
    await server.close();
    await rm(dir, { recursive: true, force: true });
  });

  /** Connects without reading, sends the hello and `count` requests of `method`. */
  const flood = (method: string, count: number) => {
    const socket = connect(path);
    socket.on('error', () => {});
    socket.setEncoding('utf8');
    socket.pause();
    socket.write(`{"hello":1}\n${`{"id":1,"method":"${method}"}\n`.repeat(count)}`);
    return socket;
  };

  /** Reads everything the daemon sends until `count` lines have come (the hello and the replies). */
  const readAll = (socket: ReturnType<typeof connect>, count: number) => {
    let lines = 0;
    const all = new Promise<void>((resolve) => {
      socket.on('data', (d: string) => {
        for (const c of d) if (c === '\n') lines++;
        if (lines >= count) resolve();
      });
      socket.resume();
    });
    // 50,000 replies take a second or two here.
    const ms = 60_000;
    return within(all, ms, () => new Error(`${lines} of ${count} lines (the hello and the replies) within ${ms} ms`));
  };

  const settle = () => new Promise((r) => setTimeout(r, 500));

  test('the daemon stops reading requests while the replies wait to be written, and serves them all once read', async () => {
    const count = 50_000; // 50 MB of replies
    const socket = flood('status', count);
    await settle();
    // What the kernel's socket buffers and one full write buffer hold: a few hundred replies,
    // whatever the client sent.
    expect(served).toBeGreaterThan(0);
    expect(served).toBeLessThan(2000);
    await settle();
    expect(served).toBeLessThan(2000);
    await readAll(socket, count + 1);
    expect(served).toBe(count);
    socket.destroy();
  });

  test(`at most ${MAX_IN_FLIGHT} requests of one connection wait for their handlers; the rest wait unread`, async () => {
    const count = 5000;
    const socket = flood('held', count);
    await settle();
    expect(served).toBe(MAX_IN_FLIGHT);
    release();
    await readAll(socket, count + 1);
    expect(served).toBe(count);
    socket.destroy();
  });
});

describe('the ready line a daemon writes to whoever started it', () => {
  const ready = { master: '/dev/ublkb0', slave: null, pid: 42, state: 'plain', recovered: false, layout: { queues: 1, depth: 128, zeroCopy: true } };

  test('ready, or an error, is taken as it is', () => {
    expect(checkReadyLine({ ready }, 'p')).toEqual({ ready });
    expect(checkReadyLine({ error: { code: 'EBUSY', message: 'busy' } }, 'p')).toEqual({ error: { code: 'EBUSY', message: 'busy' } });
  });

  test('anything else is EPROTO saying what is wrong', () => {
    expect(() => checkReadyLine({ ready: { ...ready, pid: 0 } }, 'p')).toThrow(
      expect.objectContaining({ code: 'EPROTO', message: 'the daemon of "p" reported a malformed start: ready.pid must be a whole number from 1 to 9007199254740991' }),
    );
    expect(() => checkReadyLine({}, 'p')).toThrow(expect.objectContaining({ code: 'EPROTO', message: 'the daemon of "p" reported a malformed start: ready must be an object' }));
  });
});
