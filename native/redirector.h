// A first touch in a snapshot, redirected by the queue thread that wrote it: the redirect bits,
// the map journal's record, and `commitPending`, set in the order rule 4 of docs/serving.md
// gives, under a lock the engine takes whenever it reads or changes the map's bookkeeping (its
// commit's capture, its own map changes, the journal's trim). The engine learns of each such
// redirect at its next hold(), and marks the chunks and pages they dirtied before it captures
// anything. Without this, each first touch waited for a round trip through the Node main thread.
#pragma once

#include <napi.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <vector>

namespace cldd {

struct Published;
struct Extent;

class Redirector : public Napi::ObjectWrap<Redirector> {
 public:
  static Napi::Function Define(Napi::Env env);
  // The redirector `value` is, or null (not one, or absent).
  static Redirector* From(const Napi::Value& value);
  explicit Redirector(const Napi::CallbackInfo& info);

  // Redirects the blocks [ranges[2i], ranges[2i + 1]) of `count` first touches whose writes to
  // the change area completed: all of them, or (false) none, when the engine holds the lock past
  // the bound, the mode is not snapshot, the engine has not configured it, or the journal's write
  // failed; the engine then redirects them as before. Any thread; no JS.
  bool Redirect(const Published& p, const uint64_t* ranges, size_t count);

  // A map commit of the first touches redirected here, built by a master flush's queue thread
  // instead of the engine (docs/serving.md, "A flush's commit on its queue thread"). Captures
  // the redirects not yet captured, under the lock: their map pages, and the tracking pages of
  // their chunks not yet durably marked, encoded into `meta` (the device's metadata buffer), with
  // the superblock; appends the steps (an fdatasync, the pages, an fdatasync, the superblock, an
  // fdatasync) to `steps`. False, with nothing captured, unless the engine allowed it at its
  // last release (it has nothing of its own to commit and no commit of its own runs), the mode
  // is snapshot, no other such commit runs, there is something to capture and it fits `meta`:
  // the flush then goes to the engine, as before. Any thread; no JS.
  bool CaptureCommit(const Published& p, uint8_t* meta, size_t metaBytes, std::vector<Extent>* steps);
  // Whether CaptureCommit may accept now, read without the lock: in a snapshot, no such commit
  // running, and the engine allowing it at its last release. A hint (CaptureCommit checks again
  // under the lock), so that a request the engine must commit anyway goes to it at once.
  bool MayCommit(const Published& p) const;
  // The captured commit's steps ended (`error`: 0, or the errno that failed one). Done: the pages'
  // slots, the commit state and the committed superblock move on, the chunks' marks are durable,
  // and commitPending is lowered when nothing came after. Failed: no more such commits, and the
  // engine fails the volume at its next hold (commit_state::kFailed). True when the engine waits
  // for this commit to end (it raised published::kNativeCommit to 2): the caller wakes it.
  bool CommitDone(const Published& p, int error);

 private:
  // hold(): takes the lock (bounded) and returns [journal length, start, end, set, ...], the
  // ranges redirected here since the last hold (and how many of each range's bits were clear),
  // which it forgets; null when there are none. release(journalFd, journalLength, enabled):
  // where the journal is now, and whether first touches may be redirected here; drops the lock.
  // redirect(publication, ranges): Redirect, for the engine's tests.
  // configureCommit(setup), under hold(): what CaptureCommit reads and writes (the engine's
  // PageSlots, commit state, committed superblock image, tracking marks and layout).
  // captureCommit(publication, meta) and commitDone(publication, errno): CaptureCommit (its steps
  // as (kind, offset, length, bufferOffset) records, or null) and CommitDone (whether the engine
  // waits to be woken), for the tests.
  Napi::Value Hold(const Napi::CallbackInfo& info);
  Napi::Value Release(const Napi::CallbackInfo& info);
  Napi::Value RedirectJs(const Napi::CallbackInfo& info);
  Napi::Value ConfigureCommit(const Napi::CallbackInfo& info);
  Napi::Value CaptureCommitJs(const Napi::CallbackInfo& info);
  Napi::Value CommitDoneJs(const Napi::CallbackInfo& info);

  // What a queue thread's commit works on: the engine's arrays (kept referenced) and layout.
  struct CommitSetup {
    uint8_t* slot = nullptr;         // per map page: the slot holding its committed version
    double* sequence = nullptr;      // per map page: that version's sequence
    double* slotCommit = nullptr;    // per map page: that version's commit number
    size_t pages = 0;                // map pages, tracking pages included
    double* state = nullptr;         // commit_state (wire.h)
    uint8_t* sbImage = nullptr;      // the committed superblock, a block
    uint32_t* marked = nullptr;      // tracking marks in memory (ChangeTracking.marked); null: none
    size_t markedWords = 0;
    uint32_t blockSize = 0;
    uint64_t mapOffset = 0;
    uint64_t mapPages = 0;           // redirect pages
    uint64_t trackingPages = 0;      // per set
    uint32_t trackingWordsPerPage = 0;
    std::vector<Napi::Reference<Napi::TypedArray>> refs;
  };
  // The commit CaptureCommit captured and CommitDone finishes.
  struct Captured {
    std::vector<uint64_t> pages;     // map pages written, in image order
    uint64_t trackingFrom = 0;       // pages[trackingFrom..] are tracking pages
    uint64_t mapCommit = 0;
    uint32_t digest = 0;
    uint64_t journalMark = 0;
    const uint8_t* images = nullptr; // pages' images, then the superblock's
  };

  std::timed_mutex mu_;
  // Guarded by mu_.
  bool held_ = false;
  bool enabled_ = false;
  int journalFd_ = -1;
  uint64_t journalLength_ = 0;
  // Written under mu_; also read without it, as a hint, before a queue thread's commit waits
  // for the lock (CaptureCommit).
  std::atomic<bool> commitAllowed_{false};
  bool committing_ = false;
  bool commitFailed_ = false;
  // (start, end, set, captured) per redirect since the last hold; captured: 1 once a queue
  // thread's commit holds it, so the engine leaves its pages and marks clean.
  std::vector<double> redirected_;
  std::vector<uint8_t> records_;
  CommitSetup setup_;
  Captured captured_;
};

}  // namespace cldd
