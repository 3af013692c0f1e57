/**
 * Every number that crosses between TypeScript and the addon is defined once on each side
 * (src/native/wire.ts and src/engine/publication.ts; native/wire.h): the addon exports its own,
 * and they must be the same.
 */
import { expect, test } from 'vitest';
import { COMMIT_STATE, COMMIT_STATE_FIELDS } from '../src/engine/commit.js';
import { FAST_MODE, PUBLISHED_WORD, PUBLISHED_WORDS } from '../src/engine/publication.js';
import { RECORD } from '../src/format/map-journal.js';
import { addon } from '../src/native/addon.js';
import { COMMIT_SYNC_SKIPPABLE, EVENTS, EXTENT_KIND, REQUEST_FLAGS, SUBMIT_FLAGS, TAG_STATE } from '../src/native/wire.js';
import { LIMITS } from '../src/protocol/config.js';

test('the engine reads and writes the publication with the numbers the addon uses', () => {
  const { wire } = addon();
  expect(wire.publishedWord).toEqual({ ...PUBLISHED_WORD, count: PUBLISHED_WORDS });
  expect(wire.fastMode).toEqual(FAST_MODE);
});

test('plans, store steps, request records and the events buffer use the addon\'s numbers', () => {
  const { wire } = addon();
  expect(wire.extentKind).toEqual(EXTENT_KIND);
  expect(wire.submitFlags).toEqual(SUBMIT_FLAGS);
  expect(wire.requestFlags).toEqual(REQUEST_FLAGS);
  expect(wire.events).toEqual(EVENTS);
  expect(wire.commitSyncSkippable).toBe(COMMIT_SYNC_SKIPPABLE);
  expect(wire.commitState).toEqual({ ...COMMIT_STATE, count: COMMIT_STATE_FIELDS });
});

test("the daemon names a queue thread's tags by the addon's numbers", () => {
  expect(addon().wire.tagState).toEqual(TAG_STATE);
});

test('a queue thread writes map journal records of the journal\'s own size', () => {
  expect(addon().wire.journalRecord).toBe(RECORD);
});

test("a pair's POLL_US is bounded by the limit the addon clamps it to", () => {
  expect(addon().wire.maxPollMicros).toBe(LIMITS.pollMicros.max);
});
