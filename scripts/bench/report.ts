import { readFile, writeFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';

const REPORT = fileURLToPath(new URL('../../docs/benchmarks.md', import.meta.url));
const HEADER = '# Benchmarks\n\nWritten by `npm run bench`; each section is replaced by the run that measured it.\n';

/** Replaces (or appends) the section between markers named `key` in docs/benchmarks.md. */
export async function writeSection(key: string, title: string, body: string): Promise<void> {
  let text: string;
  try {
    text = await readFile(REPORT, 'utf8');
  } catch {
    text = HEADER;
  }
  const start = `<!-- ${key}:start -->`;
  const end = `<!-- ${key}:end -->`;
  const section = `${start}\n## ${title}\n\n${body}\n${end}`;
  const i = text.indexOf(start);
  const j = text.indexOf(end);
  text = i >= 0 && j > i ? text.slice(0, i) + section + text.slice(j + end.length) : `${text.trimEnd()}\n\n${section}\n`;
  await writeFile(REPORT, text);
}
