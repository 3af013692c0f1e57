// Every number that crosses between the addon and TypeScript, defined once on this side:
// src/native/wire.ts holds the same numbers (the publication's words and modes:
// src/engine/publication.ts, which owns that layout), the addon exports these as `wire`, and
// test/wire.test.ts checks that both sides agree.
#pragma once

#include <cstddef>
#include <cstdint>

namespace cldd {

// How an extent's data moves, in the records JS submits (a plan's IoOp kinds,
// src/io/block-store.ts, and a store's ordered steps). kSync is an fdatasync of the backing file
// (a store's flush, a fast flush, a step of a commit); kMeta writes engine metadata (a commit's
// map page or superblock) from the device's metadata buffer.
enum Kind : uint8_t { kRead = 0, kWrite = 1, kZero = 2, kSync = 3, kMeta = 4 };

// The second number of a plan record JS submits for a tag (device.cc's Submit): what happens
// once its extents are done. 0: the request completes; kSubmitNeedsEngine: the engine finishes
// it first; kSubmitInOrder: a flush running a commit's steps (kSync and kMeta extents), each
// after the one before it, then the request completes.
constexpr double kSubmitNeedsEngine = 1;
constexpr double kSubmitInOrder = 2;
// A commit's kSync step as (kSync, count, 0, kCommitSyncSkippable): the flush running the commit
// may skip it when its own fdatasync, started after it arrived, began at map-change count
// `count` (the capture's). Otherwise (kSync, 0, 0, 0): always run.
constexpr double kCommitSyncSkippable = 1;

// A new request as the device reports it: (tag, op, flags, offset bytes, length bytes); op is
// the kernel's UBLK_IO_OP_*, flags a set of these bits.
constexpr size_t kRequestFields = 5;
constexpr uint32_t kRequestFua = 1;
// A snapshot write the queue thread ran for the engine to redirect: (tag, errno, offset, length).
constexpr size_t kRedirectFields = 4;
// The events buffer, per tag of depth: requests, then ordered and done (tag, errno) pairs, then
// redirects.
constexpr size_t kEventsPerTag = kRequestFields + 2 + 2 + kRedirectFields;

// Indices of the engine's published words, and the fast path's modes.
namespace published {
constexpr int kMode = 0;
constexpr int kCommitPending = 1;
constexpr int kGeneration = 2;
// First touches a queue thread redirected (native/redirector.h) that the engine has not taken yet.
constexpr int kRedirected = 3;
// Map changes made so far (bits set or cleared, by the engine or a queue thread), each counted
// after its data completed: what a commit's first fdatasync may leave to its flush's own
// (docs/serving.md, "A flush's own sync"). Wraps at 2^32.
constexpr int kMapChanges = 4;
// 1 while a queue thread's map commit runs (native/redirector.h, CaptureCommit to CommitDone):
// the engine waits for it before a commit of its own, and counts it as something to commit. The
// engine raises it to 2 (1 -> 2, compare-and-swap) when it waits: the thread that ends the
// commit (an exchange with 0) then wakes it.
constexpr int kNativeCommit = 5;
constexpr size_t kWords = 6;
}  // namespace published
// One record of the map journal, as src/format/map-journal.ts (RECORD) lays it out: first block
// (f64), end block (f64), 1 = redirected (u8), 7 zero bytes.
constexpr size_t kJournalRecord = 24;

// The commit state the engine and a queue thread's map commit share (CommitWriter.state in
// src/engine/commit.ts; native/redirector.h), read and written under the map lock only: the
// next map commit's number, the superblock copy holding the committed superblock, that
// superblock's generation, map commit and digest (what the next commit builds on); the queue
// threads' commits completed so far, the journal's length the last of them captured, the errno
// of one that failed (0: none), and the tracking period the threads' marks belong to.
namespace commit_state {
constexpr int kNextCommit = 0;
constexpr int kSbCopy = 1;
constexpr int kGeneration = 2;
constexpr int kMapCommit = 3;
constexpr int kDigest = 4;
constexpr int kDone = 5;
constexpr int kJournalMark = 6;
constexpr int kFailed = 7;
constexpr int kPeriod = 8;
constexpr size_t kFields = 9;
}  // namespace commit_state

// What a queue thread's tag is doing, as Device::Inspect reports it (src/ublk/device.ts names
// them): between requests (kFetching), with the engine (kEngine planning it, kRunning its plan's
// extents, kWaiting for the engine to finish or redirect it), or served by the thread alone (kFast).
enum class TagState : uint8_t { kIdle = 0, kFetching = 1, kEngine = 2, kRunning = 3, kWaiting = 4, kDead = 5, kFast = 6 };

// The longest a queue thread may poll its ring before it sleeps, µs (the device's pollMicros;
// POLL_US in a pair's configuration, whose limit in src/protocol/config.ts is this).
constexpr double kMaxPollMicros = 10000;

enum FastMode : int32_t { kFastOff = 0, kFastPlain = 1, kFastSnapshot = 2, kFastResync = 3 };

}  // namespace cldd
