/**
 * Text that came from outside cldd's own code (a store's name, a path, a device, an error
 * message) goes through `printable` before it reaches a terminal or a log line: a crafted name
 * must not be able to start a new line, move the cursor or send an escape sequence.
 *
 * Escaped, in the style of C and JSON: the backslash itself, every C0 control (newline, tab,
 * ESC, ...), DEL, every C1 control (U+0080-U+009F, which some terminals take as 8-bit escape
 * sequences such as CSI U+009B), the Unicode line and paragraph separators and the bidirectional
 * controls that reorder what a terminal shows. Everything else prints as it is.
 */
// eslint-disable-next-line no-control-regex
const UNSAFE = /[\\\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]/g;

const NAMED: Record<string, string> = { '\\': '\\\\', '\n': '\\n', '\r': '\\r', '\t': '\\t' };

export function printable(value: unknown): string {
  return String(value).replace(UNSAFE, (c) => {
    const code = c.charCodeAt(0);
    return NAMED[c] ?? (code < 0x100 ? `\\x${code.toString(16).padStart(2, '0')}` : `\\u${code.toString(16).padStart(4, '0')}`);
  });
}

/** A template tag: every interpolated value goes through `printable`, the literal text does not. */
export function text(strings: TemplateStringsArray, ...values: unknown[]): string {
  return strings.reduce((out, s, i) => out + printable(values[i - 1]) + s);
}
