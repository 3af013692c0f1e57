#include "serving.h"

#include "redirector.h"
#include "ublk.h"

namespace cldd {

namespace {

// Whether every block of [start, end) has its redirect bit equal to `value`.
bool AllBits(const Published& p, uint64_t start, uint64_t end, bool value) {
  for (uint64_t b = start; b < end;) {
    if ((b & 31) == 0 && b + 32 <= end) {
      uint32_t word = __atomic_load_n(&p.bits[b >> 5], __ATOMIC_RELAXED);
      if (word != (value ? 0xffffffffu : 0u)) return false;
      b += 32;
      continue;
    }
    if (p.Bit(b) != value) return false;
    b++;
  }
  return true;
}

// Whether every chunk of the master bytes [offset, offset + length) has its durable mark.
bool AllMarked(const Published& p, uint64_t offset, uint64_t length) {
  uint64_t first = offset >> p.chunkShift, last = (offset + length - 1) >> p.chunkShift;
  if ((last >> 5) >= p.trackWords) return false;
  for (uint64_t c = first; c <= last; c++) {
    if (!((__atomic_load_n(&p.trackBits[c >> 5], __ATOMIC_RELAXED) >> (c & 31)) & 1)) return false;
  }
  return true;
}

Extent Area(const Published& p, uint8_t kind, bool change, uint64_t start, uint64_t end, uint64_t first) {
  const Geometry& g = p.geometry;
  uint64_t base = change ? g.changeOffset : g.dataOffset;
  return Extent{kind, base + (start << g.blockShift), uint32_t((end - start) << g.blockShift),
                uint32_t((start - first) << g.blockShift), 0};
}

}  // namespace

// The rules (docs/serving.md): within one published mode the bits only move one way (snapshot
// sets them, resync clears them), so a decision that holds when the bits are read still holds
// when the I/O runs; the mode itself changes only while no fast request is in flight.
Fast PlanFast(const Published& p, Target target, uint32_t opFlags, uint64_t offset, uint64_t length,
              std::vector<Extent>* out) {
  constexpr Fast no = Fast::kEngine, yes = Fast::kServe;
  if (!p.words || !p.bits) return no;
  int32_t mode = p.Word(published::kMode);
  if (mode == kFastOff) return no;
  uint8_t op = uint8_t(opFlags & 0xff);
  if (op == UBLK_IO_OP_FLUSH) {
    // A flush commits map changes when there are any; else it is an fdatasync.
    if (target != Target::kMaster || p.Word(published::kCommitPending) != 0) return no;
    out->push_back(Extent{kSync, 0, 0, 0, 0});
    return yes;
  }
  if (op != UBLK_IO_OP_READ && op != UBLK_IO_OP_WRITE) return no;
  // Anything malformed gets the engine's error.
  const Geometry& g = p.geometry;
  uint64_t mask = (uint64_t(1) << g.blockShift) - 1;
  if (length == 0 || (offset & mask) || (length & mask)) return no;
  uint64_t start = offset >> g.blockShift, end = start + (length >> g.blockShift);
  if (end > g.blocks || end < start || ((end + 31) >> 5) > p.bitWords) return no;

  if (op == UBLK_IO_OP_READ) {
    if (target == Target::kSlave) {
      if (mode != kFastSnapshot) return no;
      out->push_back(Area(p, kRead, false, start, end, start));
      return yes;
    }
    // One extent per run of equal bits.
    uint64_t runStart = start;
    bool runValue = p.Bit(start);
    for (uint64_t b = start + 1; b <= end; b++) {
      bool v = b < end && p.Bit(b);
      if (b == end || v != runValue) {
        out->push_back(Area(p, kRead, runValue, runStart, b, start));
        runStart = b;
        runValue = v;
      }
    }
    return yes;
  }
  // Writes: the slave is read-only, the engine's. So is a write in place to a chunk whose change
  // mark is not durable yet: the engine makes it durable before the write is issued. A write in
  // a snapshot needs no durable mark: it is part of the master only through its blocks'
  // redirects, and the engine marks their chunks before it sets the bits, so the commit that
  // makes a bit durable makes the mark durable too (docs/format.md, "Changed-block tracking").
  if (target != Target::kMaster) return no;
  if (opFlags & UBLK_IO_F_FUA) {
    // A FUA write commits. With nothing to commit that is the write and an fdatasync, in that
    // order: what a write and a fast flush after it do. Where the write goes depends on bits in
    // a snapshot (all set, else it is a first touch) and in resync (none set), and a bit
    // the engine changed counts only once a commit has it: the engine raises commitPending
    // before it changes a bit (rule 4 of docs/serving.md), with a sequentially consistent store
    // each (BlockMap.assign). The fence makes a bit read above its change's witness: this
    // thread then reads commitPending as raised, or as lowered again by the commit that made
    // the change durable. Without it a CPU that reorders loads (not x86) could read
    // commitPending first, as it was before the change.
    //
    // In a snapshot with something to commit (a first touch, or bits a commit does not hold
    // yet), the thread runs the write, redirects a first touch itself and commits, as a write
    // and the flush after it would (docs/serving.md, "A FUA write's commit on its queue
    // thread"), when the redirector may commit now; else the engine takes it, as before.
    bool change = mode == kFastSnapshot;
    bool all = true;
    if (mode == kFastSnapshot) {
      all = AllBits(p, start, end, true);
    } else if (mode == kFastResync) {
      if (!AllBits(p, start, end, false)) return no;
    } else if (mode != kFastPlain) {
      return no;
    }
    // In place, the chunks' durable marks first (as for any write in place, below).
    if (!change && p.trackBits && !AllMarked(p, offset, length)) return no;
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    if (all && p.Word(published::kCommitPending) == 0) {
      out->push_back(Area(p, kWrite, change, start, end, start));
      out->push_back(Extent{kSync, 0, 0, 0, 0});
      return Fast::kServeInOrder;
    }
    if (!change || !p.redirector || !p.redirector->MayCommit(p)) return no;
    out->push_back(Area(p, kWrite, true, start, end, start));
    return all ? Fast::kServeThenCommit : Fast::kServeRedirectCommit;
  }
  switch (mode) {
    case kFastPlain:
      if (p.trackBits && !AllMarked(p, offset, length)) return no;
      out->push_back(Area(p, kWrite, false, start, end, start));
      return yes;
    case kFastSnapshot:
      // The change area, as the engine's plan would have it. A first touch sets bits, which
      // only the engine does: after the write, before the request completes. Until then its
      // blocks read from the data area, as they did before it, and a crash or a kill loses the
      // write with the redirect it never got (it was never completed).
      out->push_back(Area(p, kWrite, true, start, end, start));
      return AllBits(p, start, end, true) ? yes : Fast::kServeThenRedirect;
    case kFastResync:
      // Blocks not redirected; a redirected one must be unredirected, under the engine's lock.
      if (p.trackBits && !AllMarked(p, offset, length)) return no;
      if (!AllBits(p, start, end, false)) return no;
      out->push_back(Area(p, kWrite, false, start, end, start));
      return yes;
    default:
      return no;
  }
}

bool OwnSyncCovers(const OwnSync& own, uint8_t kind, uint64_t offset, uint32_t length, uint32_t bufferOffset) {
  return own.done && kind == kSync && length == 0 && bufferOffset == uint32_t(kCommitSyncSkippable) && offset == own.count;
}

}  // namespace cldd

namespace cldd {

namespace {

// ownSyncCovers(done, count, records, at): OwnSyncCovers for the step record at records[at], for
// the engine's tests, which run a flush's own sync as a queue thread does (test/support/fast-path.ts).
Napi::Value OwnSyncCoversJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 4 || !info[2].IsTypedArray() || info[2].As<Napi::TypedArray>().TypedArrayType() != napi_float64_array) {
    throw Napi::TypeError::New(env, "ownSyncCovers(done, count, records: Float64Array, at)");
  }
  Napi::Float64Array r = info[2].As<Napi::Float64Array>();
  size_t at = size_t(info[3].ToNumber().Int64Value());
  if (at + 4 > r.ElementLength()) throw Napi::RangeError::New(env, "ownSyncCovers: no step record at that index");
  OwnSync own{info[0].ToBoolean(), info[1].ToNumber().Uint32Value()};
  const double* e = r.Data() + at;
  return Napi::Boolean::New(env, OwnSyncCovers(own, uint8_t(e[0]), uint64_t(e[1]), uint32_t(e[2]), uint32_t(e[3])));
}

// planFast(publication, target, opFlags, offset, length): the extents PlanFast gives a request,
// as { extents: (kind, offset, length, bufferOffset) records, redirect: whether the engine
// redirects its blocks after them }, or null when the engine must decide it. The
// queue threads call PlanFast directly; this is how the engine's tests run their workloads
// through the very same decisions.
Napi::Value PlanFastJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Published pub;
  std::string error = ReadPublication(info[0].As<Napi::Object>(), &pub);
  if (!error.empty()) throw Napi::Error::New(env, "planFast: " + error);
  Target target = info[1].ToString().Utf8Value() == "slave" ? Target::kSlave : Target::kMaster;
  uint32_t opFlags = info[2].As<Napi::Number>().Uint32Value();
  uint64_t offset = uint64_t(info[3].As<Napi::Number>().DoubleValue());
  uint64_t length = uint64_t(info[4].As<Napi::Number>().DoubleValue());
  std::vector<Extent> extents;
  Fast fast = PlanFast(pub, target, opFlags, offset, length, &extents);
  if (fast == Fast::kEngine) return env.Null();
  Napi::Object result = Napi::Object::New(env);
  result.Set("extents", ExtentRecords(env, extents));
  result.Set("redirect", fast == Fast::kServeThenRedirect || fast == Fast::kServeRedirectCommit);
  result.Set("inOrder", fast == Fast::kServeInOrder);
  // Then the thread's redirect (for kServeRedirectCommit, `redirect` above is true too) and its
  // own map commit, or the whole request again through the engine.
  result.Set("commit", fast == Fast::kServeThenCommit || fast == Fast::kServeRedirectCommit);
  return result;
}

}  // namespace

Napi::Float64Array ExtentRecords(Napi::Env env, const std::vector<Extent>& extents) {
  Napi::Float64Array out = Napi::Float64Array::New(env, 4 * extents.size());
  for (size_t i = 0; i < extents.size(); i++) {
    out[4 * i] = extents[i].kind;
    out[4 * i + 1] = double(extents[i].offset);
    out[4 * i + 2] = extents[i].length;
    out[4 * i + 3] = extents[i].bufferOffset;
  }
  return out;
}

std::string ReadPublication(const Napi::Object& p, Published* out) {
  Napi::Value words = p.Get("words"), bits = p.Get("bits"), track = p.Get("trackBits");
  if (!words.IsTypedArray() || words.As<Napi::TypedArray>().TypedArrayType() != napi_int32_array ||
      !bits.IsTypedArray() || bits.As<Napi::TypedArray>().TypedArrayType() != napi_uint32_array ||
      (!track.IsNull() && !track.IsUndefined() &&
       (!track.IsTypedArray() || track.As<Napi::TypedArray>().TypedArrayType() != napi_uint32_array))) {
    return "words must be an Int32Array, bits and trackBits Uint32Arrays";
  }
  Napi::Int32Array w = words.As<Napi::Int32Array>();
  Napi::Uint32Array b = bits.As<Napi::Uint32Array>();
  uint32_t blockSize = p.Get("blockSize").ToNumber().Uint32Value();
  double blocks = p.Get("blocks").ToNumber().DoubleValue();
  uint32_t chunkShift = p.Get("chunkShift").ToNumber().Uint32Value();
  if (w.ElementLength() < published::kWords || blockSize < 512 || (blockSize & (blockSize - 1)) || !(blocks >= 0) ||
      double(b.ElementLength()) * 32 < blocks || chunkShift > 40) {
    return "a malformed publication (words, bits, block size, blocks or chunk shift)";
  }
  out->words = w.Data();
  out->bits = b.Data();
  out->bitWords = b.ElementLength();
  if (track.IsTypedArray()) {
    Napi::Uint32Array t = track.As<Napi::Uint32Array>();
    out->trackBits = t.Data();
    out->trackWords = t.ElementLength();
    out->chunkShift = chunkShift;
  }
  out->geometry.dataOffset = uint64_t(p.Get("dataOffset").ToNumber().DoubleValue());
  out->geometry.changeOffset = uint64_t(p.Get("changeOffset").ToNumber().DoubleValue());
  out->geometry.blockShift = uint32_t(__builtin_ctz(blockSize));
  out->geometry.blocks = uint64_t(blocks);
  Napi::Value redirector = p.Get("redirector");
  if (!redirector.IsNull() && !redirector.IsUndefined()) {
    out->redirector = Redirector::From(redirector);
    if (!out->redirector) return "redirector must be the addon's Redirector";
  }
  return {};
}

void DefineServing(Napi::Env env, Napi::Object exports) {
  exports.Set("planFast", Napi::Function::New(env, PlanFastJs, "planFast"));
  exports.Set("ownSyncCovers", Napi::Function::New(env, OwnSyncCoversJs, "ownSyncCovers"));
  // native/wire.h's numbers, for the test that both sides agree (test/wire.test.ts).
  Napi::Object words = Napi::Object::New(env);
  words.Set("mode", published::kMode);
  words.Set("commitPending", published::kCommitPending);
  words.Set("generation", published::kGeneration);
  words.Set("redirected", published::kRedirected);
  words.Set("mapChanges", published::kMapChanges);
  words.Set("nativeCommit", published::kNativeCommit);
  words.Set("count", double(published::kWords));
  Napi::Object modes = Napi::Object::New(env);
  modes.Set("off", int32_t(kFastOff));
  modes.Set("plain", int32_t(kFastPlain));
  modes.Set("snapshot", int32_t(kFastSnapshot));
  modes.Set("resync", int32_t(kFastResync));
  Napi::Object kinds = Napi::Object::New(env);
  kinds.Set("read", int32_t(kRead));
  kinds.Set("write", int32_t(kWrite));
  kinds.Set("zero", int32_t(kZero));
  kinds.Set("sync", int32_t(kSync));
  kinds.Set("meta", int32_t(kMeta));
  Napi::Object flags = Napi::Object::New(env);
  flags.Set("needsEngine", kSubmitNeedsEngine);
  flags.Set("inOrder", kSubmitInOrder);
  Napi::Object requestFlags = Napi::Object::New(env);
  requestFlags.Set("fua", double(kRequestFua));
  Napi::Object events = Napi::Object::New(env);
  events.Set("requestFields", double(kRequestFields));
  events.Set("redirectFields", double(kRedirectFields));
  events.Set("perTag", double(kEventsPerTag));
  Napi::Object wire = Napi::Object::New(env);
  wire.Set("publishedWord", words);
  wire.Set("fastMode", modes);
  wire.Set("extentKind", kinds);
  wire.Set("submitFlags", flags);
  wire.Set("requestFlags", requestFlags);
  wire.Set("events", events);
  wire.Set("journalRecord", double(kJournalRecord));
  wire.Set("commitSyncSkippable", kCommitSyncSkippable);
  wire.Set("maxPollMicros", kMaxPollMicros);
  Napi::Object state = Napi::Object::New(env);
  state.Set("nextCommit", commit_state::kNextCommit);
  state.Set("sbCopy", commit_state::kSbCopy);
  state.Set("generation", commit_state::kGeneration);
  state.Set("mapCommit", commit_state::kMapCommit);
  state.Set("digest", commit_state::kDigest);
  state.Set("done", commit_state::kDone);
  state.Set("journalMark", commit_state::kJournalMark);
  state.Set("failed", commit_state::kFailed);
  state.Set("period", commit_state::kPeriod);
  state.Set("count", double(commit_state::kFields));
  wire.Set("commitState", state);
  Napi::Object tagStates = Napi::Object::New(env);
  tagStates.Set("idle", int32_t(TagState::kIdle));
  tagStates.Set("fetching", int32_t(TagState::kFetching));
  tagStates.Set("engine", int32_t(TagState::kEngine));
  tagStates.Set("running", int32_t(TagState::kRunning));
  tagStates.Set("waiting", int32_t(TagState::kWaiting));
  tagStates.Set("dead", int32_t(TagState::kDead));
  tagStates.Set("fast", int32_t(TagState::kFast));
  wire.Set("tagState", tagStates);
  exports.Set("wire", wire);
}

}  // namespace cldd
