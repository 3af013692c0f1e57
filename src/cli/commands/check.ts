import type { Argv, CommandModule } from 'yargs';
import { check, describeSuperblock, type Finding } from '../../engine/check.js';
import { describeForeignSignature, listSignatures, signaturesOverStore } from '../probe.js';
import { FileStore } from '../../io/file-store.js';
import { CldError } from '../../errors.js';
import { printable, text } from '../../printable.js';
import { parsePath } from '../options.js';
import { ExitCode, printError, printJson } from '../output.js';

interface Args {
  backing: string;
  json: boolean;
}

export const checkCommand: CommandModule<object, Args> = {
  command: 'check <backing>',
  describe: 'Verify a cldd store offline: exit 0 clean, 1 damaged, 2 not checkable',
  builder: (y: Argv) =>
    y
      .positional('backing', { type: 'string', demandOption: true, describe: 'backing file or block device' })
      .option('json', { type: 'boolean', default: false, describe: 'print the report as JSON' }) as Argv<Args>,
  handler: async (args) => {
    const backing = parsePath('the backing store', args.backing);
    let report;
    const findings: Finding[] = [];
    try {
      const store = await FileStore.open(backing, { readOnly: true });
      try {
        report = await check(store);
      } finally {
        await store.close();
      }
      if (report.foreign) throw new CldError('CLDD_FOREIGN', `${backing} is not a cldd store (no cldd signature)`);
      findings.push(...report.findings);
      // Another program's signature over cldd's metadata: the store was overwritten since, and
      // cldd add refuses it without --force. libblkid does not know cldd, so it is not ambiguous.
      if (report.superblock) {
        for (const f of signaturesOverStore(report.superblock.layout, await listSignatures(backing))) {
          findings.push({ severity: 'error', message: `${describeForeignSignature(f)}: another program wrote over this store` });
        }
      }
    } catch (err) {
      // Exit 1 means damaged; a store that could not be checked at all is 2.
      printError('cldd', err);
      throw new ExitCode(2);
    }
    const clean = !findings.some((f) => f.severity === 'error');
    if (args.json) {
      printJson({
        backing,
        clean,
        state: report.superblock?.state ?? null,
        redirected: report.redirected,
        tracking: report.tracking,
        findings,
      });
    } else {
      if (report.superblock) console.log(text`${backing}: ${describeSuperblock(report.superblock)}`);
      if (report.redirected !== null) console.log(`${report.redirected} blocks redirected`);
      const t = report.tracking;
      if (t) {
        const delta = t.deltaBytes === null ? '' : `; snapshot ${t.since - 1} -> ${t.since}: ${t.deltaBytes} bytes`;
        console.log(`changed since snapshot ${t.since}: ${t.changedBytes} bytes${delta}`);
      } else if (report.superblock && report.redirected !== null) {
        console.log('no changed-block tracking (format version 2)');
      }
      for (const f of findings) console.log(`${f.severity}: ${printable(f.message)}`);
      console.log(clean ? 'clean' : 'damaged');
    }
    if (!clean) throw new ExitCode(1);
  },
};
