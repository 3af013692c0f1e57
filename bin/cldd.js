#!/usr/bin/env node
// Entry point of the cldd command; the code is built into dist/ by `npm run build`.
import { main } from '../dist/cli/index.js';

main(process.argv.slice(2)).then((code) => process.exit(code));
