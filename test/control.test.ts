import { mkdtemp, rm, stat } from 'node:fs/promises';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, test } from 'vitest';
import { DaemonClient } from '../src/daemon/client.js';
import { ControlServer } from '../src/daemon/control-server.js';
import { checkName } from '../src/daemon/paths.js';
import { CldError } from '../src/errors.js';

describe('control socket', () => {
  let dir: string;
  let server: ControlServer;
  let path: string;

  let enabled: number;

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

  test('a client speaking another protocol version is refused with CLDD_VERSION', async () => {
    const socket = connect(path);
    socket.setEncoding('utf8');
    const reply = await new Promise<string>((resolve) => {
      let text = '';
      socket.on('data', (d: string) => (text += d));
      socket.on('end', () => resolve(text));
      socket.write('{"hello": 99}\n');
    });
    expect(JSON.parse(reply)).toMatchObject({ error: { code: 'CLDD_VERSION' } });
  });

  /** Sends `text` in one write; resolves with everything the daemon sent until it closed. */
  const exchange = (text: string) =>
    new Promise<string>((resolve) => {
      const socket = connect(path);
      socket.setEncoding('utf8');
      let reply = '';
      socket.on('data', (d: string) => (reply += d));
      socket.on('close', () => resolve(reply));
      socket.on('error', () => {});
      socket.write(text);
    });

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
