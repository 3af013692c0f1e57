#!/usr/bin/env node
// The original tool's command line (clddsetup -m/-e/-d), mapped onto cldd's commands.
import { main } from '../dist/cli/clddsetup.js';

main(process.argv.slice(2)).then((code) => process.exit(code));
