import { describe, expect, test } from 'vitest';
import { printable, text } from '../src/printable.js';

describe('printable', () => {
  test('ordinary text, spaces and non-ASCII letters print as they are', () => {
    expect(printable('/srv/Disk 1/home.img')).toBe('/srv/Disk 1/home.img');
    expect(printable('café ünïcode 日本')).toBe('café ünïcode 日本');
  });

  test('newlines, tabs and carriage returns cannot start a line of their own', () => {
    expect(printable('a\nclean\r\tb')).toBe('a\\nclean\\r\\tb');
  });

  test('escape sequences, DEL and C1 controls (8-bit CSI) are escaped', () => {
    expect(printable('\x1b[2J\x1b]0;title\x07')).toBe('\\x1b[2J\\x1b]0;title\\x07');
    expect(printable('\x00\x7f\x9b31m\x85')).toBe('\\x00\\x7f\\x9b31m\\x85');
  });

  test('line separators and bidirectional overrides are escaped', () => {
    expect(printable('a\u2028b\u202egnp.exe')).toBe('a\\u2028b\\u202egnp.exe');
  });

  test('a backslash is escaped, so the printed form is unambiguous', () => {
    expect(printable('a\\nb')).toBe('a\\\\nb');
  });

  test('the text tag escapes interpolated values only', () => {
    const name = 'x\ny';
    expect(text`pair ${name}:\t${42}`).toBe('pair x\\ny:\t42');
  });
});
