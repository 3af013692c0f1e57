import { fstatSync, writeSync } from 'node:fs';
import { printable } from '../printable.js';
import type { LogLevel } from '../protocol/config.js';

const RANK: Record<LogLevel, number> = { error: 0, warn: 1, info: 2, debug: 3 };
/** systemd's journal reads these <N> prefixes as priorities (sd-daemon(3)). */
const PRIORITY: Record<LogLevel, number> = { error: 3, warn: 4, info: 6, debug: 7 };

export interface Logger {
  error(message: string): void;
  warn(message: string): void;
  info(message: string): void;
  debug(message: string): void;
}

/**
 * Logs to stderr, one line per message (a newline in one is escaped): the journal under systemd,
 * else the pair's log file on tmpfs (/run/cldd/NAME.log). A line that cannot be written is lost,
 * never the daemon: process.stderr reports a write to a full file system as an error event, and
 * with nobody listening that ended the process, leaving the pair's devices without a server. So
 * a log file is written directly, and the lines lost are counted in the next line that gets
 * through; a stream (the journal's socket) keeps process.stderr, with a listener for its errors.
 */
export function stderrLogger(level: LogLevel, name: string, journal = !!process.env.JOURNAL_STREAM, fd = 2): Logger {
  let lost = 0;
  let why = '';
  let torn = false;
  let toFile = false;
  try {
    toFile = fstatSync(fd).isFile();
  } catch {
    // No stderr at all: the stream below reports that as an error, which is counted.
  }
  if (!toFile) {
    process.stderr.on('error', (err: NodeJS.ErrnoException) => {
      lost++;
      why = err.code ?? err.message;
    });
  }
  const emit = (l: LogLevel, text: string): boolean => {
    // After a line written only in part, the next starts on a line of its own.
    const lead = torn ? '\n' : '';
    const line = Buffer.from(`${lead}${journal ? `<${PRIORITY[l]}>` : `${new Date().toISOString()} cldd[${name}] ${l}: `}${text}\n`);
    if (!toFile) {
      process.stderr.write(line);
      return true;
    }
    let done = 0;
    try {
      while (done < line.length) done += writeSync(fd, line, done, line.length - done);
      torn = false;
      return true;
    } catch (err) {
      why = (err as NodeJS.ErrnoException).code ?? String(err);
      torn ||= done > 0;
      return false;
    }
  };
  const write = (l: LogLevel, message: string) => {
    if (RANK[l] > RANK[level]) return;
    if (lost > 0 && emit('warn', `${lost} log lines before this one could not be written (${why})`)) lost = 0;
    if (lost > 0 || !emit(l, printable(message))) lost++;
  };
  return {
    error: (m) => write('error', m),
    warn: (m) => write('warn', m),
    info: (m) => write('info', m),
    debug: (m) => write('debug', m),
  };
}
