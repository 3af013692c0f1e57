/** A daemon backend with a plain file store and no devices: the daemon's logic on any machine. */
import type { Backend } from '../../src/daemon/daemon.js';
import { FileStore } from '../../src/io/file-store.js';
import type { Freezer } from '../../src/system/freeze.js';
import { StoreExecutor } from './disk.js';

export const engineOnlyBackend = (freezer: Freezer): Backend => ({
  async open(path) {
    const store = await FileStore.open(path);
    return { store, executor: new StoreExecutor(store) };
  },
  startDevices: null,
  freezer,
  notify: () => {},
});

