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

/** Logs to stderr, one line per message (a newline in one is escaped): the journal under systemd. */
export function stderrLogger(level: LogLevel, name: string, journal = !!process.env.JOURNAL_STREAM): Logger {
  const write = (l: LogLevel, message: string) => {
    if (RANK[l] > RANK[level]) return;
    const text = printable(message);
    const line = journal ? `<${PRIORITY[l]}>${text}` : `${new Date().toISOString()} cldd[${name}] ${l}: ${text}`;
    process.stderr.write(`${line}\n`);
  };
  return {
    error: (m) => write('error', m),
    warn: (m) => write('warn', m),
    info: (m) => write('info', m),
    debug: (m) => write('debug', m),
  };
}
