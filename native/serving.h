// The fast path's decisions: what a queue thread may serve without the engine, read from what the
// engine publishes (src/engine/publication.ts; the protocol and why it is safe: docs/serving.md).
// A pure function of the publication, so the engine's tests run it too (addon `planFast`).
#pragma once

#include <napi.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "wire.h"

namespace cldd {

struct Extent {
  uint8_t kind;
  uint64_t offset;
  uint32_t length;
  uint32_t bufferOffset;
  uint32_t done;
};

enum class Target : uint8_t { kMaster = 0, kSlave = 1 };

// Where the volume's areas are; fixed for the life of a volume.
struct Geometry {
  uint64_t dataOffset = 0;
  uint64_t changeOffset = 0;
  uint32_t blockShift = 12;
  uint64_t blocks = 0;
};

// The publication as the queue threads see it: words and the bitmaps belong to JS ArrayBuffers
// the device keeps referenced; JS writes the words with Atomics.
class Redirector;

struct Published {
  const int32_t* words = nullptr;
  const uint32_t* bits = nullptr;
  size_t bitWords = 0;
  // Changed-block tracking (src/engine/change-tracking.ts): bit c set once chunk c's mark for the
  // current period is durable; chunk c covers master bytes [c << chunkShift, (c + 1) << chunkShift).
  // Null for a store without tracking.
  const uint32_t* trackBits = nullptr;
  size_t trackWords = 0;
  uint32_t chunkShift = 0;
  Geometry geometry;
  // Where a queue thread redirects the first touches it wrote (the master's only); null: the
  // engine does, as before.
  Redirector* redirector = nullptr;

  int32_t Word(int index) const { return __atomic_load_n(&words[index], __ATOMIC_SEQ_CST); }
  bool Bit(uint64_t block) const {
    return (__atomic_load_n(&bits[block >> 5], __ATOMIC_RELAXED) >> (block & 31)) & 1;
  }
};

// What the fast path does with a request: leaves it to the engine; serves it (its extents are
// appended to `out`); or, for a snapshot write to blocks not all redirected yet, runs its
// extents (the change area, where the engine's plan would put it too) and then hands it to the
// engine, which redirects the blocks before the request completes (Volume.finishFastRedirect).
// kServeInOrder: the extents run one after another (a FUA write: the write, then an fdatasync).
// kServeThenCommit and kServeRedirectCommit: a FUA write in a snapshot with something to commit
// (docs/serving.md, "A FUA write's commit on its queue thread"): its write (the change area),
// then, for the second, the thread's redirect of its blocks, then the thread's own map commit;
// when the redirect or the commit cannot be done there, the engine takes the whole request.
enum class Fast : uint8_t {
  kEngine = 0,
  kServe = 1,
  kServeThenRedirect = 2,
  kServeInOrder = 3,
  kServeThenCommit = 4,
  kServeRedirectCommit = 5,
};

// The fast path's decision for a request. `opFlags` is the descriptor's op_flags (opcode in the
// low byte).
Fast PlanFast(const Published& p, Target target, uint32_t opFlags, uint64_t offset, uint64_t length,
              std::vector<Extent>* out);

// A flush's own fdatasync (docs/serving.md, "A flush's own sync"): its queue thread runs one
// while the engine builds the flush's commit, having read the map-change count just before.
struct OwnSync {
  bool done = false;     // it ran and succeeded
  uint32_t count = 0;    // published::kMapChanges just before it began
};

// Whether a commit's step, as its record gives it (kind, offset, length, bufferOffset), is an
// fdatasync that `own` makes needless: one the engine marked skippable at the count `own` began
// at. Every map change the commit holds was then counted, so its data had completed, before that
// fdatasync began; and the commit serves no request but the flush that ran it.
bool OwnSyncCovers(const OwnSync& own, uint8_t kind, uint64_t offset, uint32_t length, uint32_t bufferOffset);

// Reads a publication (words, bits, trackBits, chunkShift, dataOffset, changeOffset, blockSize,
// blocks) from JS into `out`; returns what is wrong with it, or nothing. The arrays must stay
// referenced by the caller for as long as `out` is used.
std::string ReadPublication(const Napi::Object& p, Published* out);

// `extents` as the records the engine's tests read: (kind, offset, length, bufferOffset) each.
Napi::Float64Array ExtentRecords(Napi::Env env, const std::vector<Extent>& extents);

// Exports planFast and the numbers above (exports.serving) for the engine's tests.
void DefineServing(Napi::Env env, Napi::Object exports);

}  // namespace cldd
