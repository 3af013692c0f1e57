#include "redirector.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>

#include "checksum.h"
#include "serving.h"

namespace cldd {

namespace {

// How long a queue thread waits for the engine's lock before it hands its first touches to the
// engine instead: about what that hand-off costs (0.5-0.9 ms a batch in the test VM,
// docs/benchmarks.md), so waiting longer would only be slower.
constexpr auto kThreadWait = std::chrono::microseconds(1000);
// The engine's own wait: a queue thread holds the lock for one write to tmpfs and the bits.
constexpr auto kEngineWait = std::chrono::seconds(10);

const napi_type_tag kTag = {0x636c64645f726564ULL, 0x6972656374307631ULL};

}  // namespace

Napi::Function Redirector::Define(Napi::Env env) {
  return DefineClass(env, "Redirector",
                     {InstanceMethod<&Redirector::Hold>("hold"), InstanceMethod<&Redirector::Release>("release"),
                      InstanceMethod<&Redirector::RedirectJs>("redirect"),
                      InstanceMethod<&Redirector::ConfigureCommit>("configureCommit"),
                      InstanceMethod<&Redirector::CaptureCommitJs>("captureCommit"),
                      InstanceMethod<&Redirector::CommitDoneJs>("commitDone")});
}

Redirector::Redirector(const Napi::CallbackInfo& info) : Napi::ObjectWrap<Redirector>(info) {
  info.This().As<Napi::Object>().TypeTag(&kTag);
}

Redirector* Redirector::From(const Napi::Value& value) {
  if (!value.IsObject()) return nullptr;
  Napi::Object o = value.As<Napi::Object>();
  if (!o.CheckTypeTag(&kTag)) return nullptr;
  return Unwrap(o);
}

bool Redirector::Redirect(const Published& p, const uint64_t* ranges, size_t count) {
  if (count == 0) return true;
  std::unique_lock<std::timed_mutex> lock(mu_, std::defer_lock);
  if (!lock.try_lock_for(kThreadWait)) return false;
  if (!enabled_ || !p.words || p.Word(published::kMode) != kFastSnapshot) return false;
  const uint64_t blocks = p.geometry.blocks;
  for (size_t i = 0; i < count; i++) {
    if (ranges[2 * i] >= ranges[2 * i + 1] || ranges[2 * i + 1] > blocks || ((ranges[2 * i + 1] + 31) >> 5) > p.bitWords) return false;
  }
  // The words and bits are JS's (Int32Array, Uint32Array); JS writes them with Atomics too.
  auto* words = const_cast<int32_t*>(p.words);
  auto* bits = const_cast<uint32_t*>(p.bits);
  // 1. A flush from now on has something to commit.
  if (__atomic_load_n(&words[published::kCommitPending], __ATOMIC_SEQ_CST) == 0) {
    __atomic_store_n(&words[published::kCommitPending], 1, __ATOMIC_SEQ_CST);
    __atomic_add_fetch(&words[published::kGeneration], 1, __ATOMIC_SEQ_CST);
  }
  // 2. The journal has the changes (src/format/map-journal.ts has the record's layout), in one
  // write: a daemon killed once a write completed must find its redirect.
  if (journalFd_ >= 0) {
    records_.assign(count * kJournalRecord, 0);
    for (size_t i = 0; i < count; i++) {
      double start = double(ranges[2 * i]), end = double(ranges[2 * i + 1]);
      uint8_t* r = records_.data() + i * kJournalRecord;
      std::memcpy(r, &start, 8);
      std::memcpy(r + 8, &end, 8);
      r[16] = 1;
    }
    size_t done = 0;
    while (done < records_.size()) {
      ssize_t n = ::pwrite(journalFd_, records_.data() + done, records_.size() - done, off_t(journalLength_ + done));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        // tmpfs is full (or worse): cut the part off, as the engine's own append does, and let
        // the engine redirect them, which reports the error.
        if (done > 0 && ::ftruncate(journalFd_, off_t(journalLength_)) != 0) {
          // The next append overwrites the part; a death before it leaves it at the end, where a
          // record cut short is skipped.
        }
        return false;
      }
      done += size_t(n);
    }
    journalLength_ += records_.size();
  }
  // 3. Counted: their writes completed before this call (docs/serving.md, "A flush's own sync").
  __atomic_add_fetch(&words[published::kMapChanges], 1, __ATOMIC_SEQ_CST);
  // 4. Only then the bits.
  for (size_t i = 0; i < count; i++) {
    uint64_t b = ranges[2 * i], end = ranges[2 * i + 1];
    // How many of them were clear: the engine adds that to its counts without recounting pages.
    uint64_t set = 0;
    while (b < end) {
      uint32_t lo = uint32_t(b & 31);
      uint32_t n = uint32_t(std::min<uint64_t>(32 - lo, end - b));
      uint32_t mask = n == 32 ? 0xffffffffu : ((1u << n) - 1) << lo;
      uint32_t old = __atomic_fetch_or(&bits[b >> 5], mask, __ATOMIC_SEQ_CST);
      set += uint64_t(__builtin_popcount(mask & ~old));
      b += n;
    }
    redirected_.push_back(double(ranges[2 * i]));
    redirected_.push_back(double(ranges[2 * i + 1]));
    redirected_.push_back(double(set));
    redirected_.push_back(0);
  }
  __atomic_add_fetch(&words[published::kRedirected], int32_t(count), __ATOMIC_SEQ_CST);
  return true;
}

Napi::Value Redirector::Hold(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!mu_.try_lock_for(kEngineWait)) {
    throw Napi::Error::New(env, "the map lock: a queue thread has held it for 10 s, redirecting first touches");
  }
  if (held_) {
    mu_.unlock();
    throw Napi::Error::New(env, "the map lock is held already");
  }
  held_ = true;
  // Nothing redirected since the last hold, as for most of them (a flush's commit holds the lock
  // two to four times): no array, which was an allocation outside V8's heap each.
  if (redirected_.empty()) return env.Null();
  Napi::Float64Array out = Napi::Float64Array::New(env, 1 + redirected_.size());
  out[0] = double(journalLength_);
  std::memcpy(out.Data() + 1, redirected_.data(), redirected_.size() * sizeof(double));
  redirected_.clear();
  return out;
}

Napi::Value Redirector::Release(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  // Only the thread that holds it gets here (JS's own calls are synchronous).
  if (!held_) throw Napi::Error::New(env, "release: the map lock is not held");
  journalFd_ = info[0].As<Napi::Number>().Int32Value();
  journalLength_ = uint64_t(info[1].As<Napi::Number>().DoubleValue());
  enabled_ = info[2].ToBoolean().Value();
  commitAllowed_ = enabled_ && info.Length() > 3 && info[3].ToBoolean().Value() && setup_.state != nullptr;
  held_ = false;
  mu_.unlock();
  return env.Undefined();
}

Napi::Value Redirector::RedirectJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Published pub;
  std::string error = ReadPublication(info[0].As<Napi::Object>(), &pub);
  if (!error.empty()) throw Napi::Error::New(env, "redirect: " + error);
  if (!info[1].IsTypedArray() || info[1].As<Napi::TypedArray>().TypedArrayType() != napi_float64_array) {
    throw Napi::TypeError::New(env, "redirect: ranges must be a Float64Array");
  }
  // The JS thread holds the lock already (a test calling this between hold and release).
  if (held_) return Napi::Boolean::New(env, false);
  Napi::Float64Array r = info[1].As<Napi::Float64Array>();
  std::vector<uint64_t> ranges(r.ElementLength() & ~size_t(1));
  for (size_t i = 0; i < ranges.size(); i++) {
    double v = r[i];
    if (!(v >= 0) || v > 9007199254740991.0) throw Napi::RangeError::New(env, "redirect: a block number out of range");
    ranges[i] = uint64_t(v);
  }
  return Napi::Boolean::New(env, Redirect(pub, ranges.data(), ranges.size() / 2));
}

// ---------------------------------------------------------------- a queue thread's map commit

namespace {

// The layout of a map page slot and of a superblock copy (docs/format.md, "Map page slots" and
// "Superblock"; src/format/format.ts encodes the same): a queue thread's commit writes the same
// bytes the engine's would, which test/native-commit.test.ts compares.
constexpr size_t kSlotHeader = 64;       // MAP_SLOT_HEADER
constexpr size_t kTrackingHeader = 8;    // TRACKING_PAGE_HEADER: the period, a u64
constexpr size_t kSuperblockBytes = 512; // SUPERBLOCK_BYTES: what its checksum covers
constexpr char kSlotMagic[8] = {'c', 'l', 'd', 'd', '-', 'm', 'a', 'p'};

void PutU64(uint8_t* at, uint64_t v) { std::memcpy(at, &v, 8); }
void PutU32(uint8_t* at, uint32_t v) { std::memcpy(at, &v, 4); }

// A page's term of the map digest: CRC-32C of (page, sequence, commit) as three u64.
uint32_t DigestTerm(uint64_t page, uint64_t sequence, uint64_t commit) {
  uint8_t b[24];
  PutU64(b, page);
  PutU64(b + 8, sequence);
  PutU64(b + 16, commit);
  return Crc32c(b, sizeof b);
}

}  // namespace

bool Redirector::MayCommit(const Published& p) const {
  return p.words && p.Word(published::kMode) == kFastSnapshot && p.Word(published::kNativeCommit) == 0 &&
         commitAllowed_.load(std::memory_order_relaxed);
}

bool Redirector::CaptureCommit(const Published& p, uint8_t* meta, size_t metaBytes, std::vector<Extent>* steps) {
  // Not in a snapshot, not allowed, or one runs: declined without the lock, which the engine may
  // hold, so that a flush the engine must commit anyway (in plain, for tracking marks) does not
  // wait up to kThreadWait first. Checked again under it.
  if (!MayCommit(p)) return false;
  std::unique_lock<std::timed_mutex> lock(mu_, std::defer_lock);
  if (!lock.try_lock_for(kThreadWait)) return false;
  if (!commitAllowed_ || committing_ || commitFailed_ || p.Word(published::kMode) != kFastSnapshot) return false;
  const CommitSetup& c = setup_;
  const uint64_t bs = c.blockSize, bitsPerPage = (bs - kSlotHeader) * 8;
  if (!meta || bs == 0 || bs != (uint64_t(1) << p.geometry.blockShift)) return false;
  // The redirect pages of what no commit holds yet, then the tracking pages of its chunks whose
  // marks are not durable (a commit that makes a redirect durable makes its chunk's mark durable:
  // change-tracking.ts), each page once.
  std::vector<uint64_t> pages, chunks;
  for (size_t i = 0; i + 3 < redirected_.size(); i += 4) {
    if (redirected_[i + 3] != 0) continue;
    uint64_t start = uint64_t(redirected_[i]), end = uint64_t(redirected_[i + 1]);
    for (uint64_t pg = start / bitsPerPage; pg <= (end - 1) / bitsPerPage; pg++) pages.push_back(pg);
    if (c.marked && p.trackBits && p.chunkShift >= p.geometry.blockShift) {
      uint32_t shift = p.chunkShift - p.geometry.blockShift;
      for (uint64_t ch = start >> shift; ch <= (end - 1) >> shift; ch++) {
        if ((ch >> 5) >= p.trackWords || (ch >> 5) >= c.markedWords) return false;
        if (!((__atomic_load_n(&p.trackBits[ch >> 5], __ATOMIC_RELAXED) >> (ch & 31)) & 1)) chunks.push_back(ch);
      }
    }
  }
  if (pages.empty()) return false;
  std::sort(pages.begin(), pages.end());
  pages.erase(std::unique(pages.begin(), pages.end()), pages.end());
  const uint64_t trackingFrom = pages.size();
  const uint64_t set = uint64_t(c.state[commit_state::kPeriod]) & 1;
  for (uint64_t ch : chunks) pages.push_back(c.mapPages + set * c.trackingPages + (ch >> 5) / c.trackingWordsPerPage);
  std::sort(pages.begin() + trackingFrom, pages.end());
  pages.erase(std::unique(pages.begin() + trackingFrom, pages.end()), pages.end());
  if ((pages.size() + 1) * bs > metaBytes || pages.back() >= c.pages || pages[trackingFrom - 1] >= c.mapPages ||
      (pages[trackingFrom - 1] + 1) * (bitsPerPage / 32) > p.bitWords) {
    return false;
  }
  // Nothing below declines: the marks go into memory now (an atomic OR: the engine marks chunks
  // outside the lock too), as the engine's hold would make them.
  for (uint64_t ch : chunks) __atomic_fetch_or(&c.marked[ch >> 5], 1u << (ch & 31), __ATOMIC_SEQ_CST);
  double* st = c.state;
  const uint64_t mapCommit = uint64_t(st[commit_state::kNextCommit]);
  uint32_t digest = uint32_t(st[commit_state::kDigest]);
  for (uint64_t pg : pages) {
    uint64_t seq = uint64_t(c.sequence[pg]);
    digest = digest - DigestTerm(pg, seq, uint64_t(c.slotCommit[pg])) + DigestTerm(pg, seq + 1, mapCommit);
  }
  const uint8_t* uuid = c.sbImage + 16;
  const uint64_t payloadBytes = bs - kSlotHeader;
  for (size_t i = 0; i < pages.size(); i++) {
    uint8_t* img = meta + i * bs;
    uint64_t pg = pages[i];
    std::memset(img, 0, bs);
    std::memcpy(img, kSlotMagic, 8);
    PutU64(img + 16, uint64_t(c.sequence[pg]) + 1);
    PutU64(img + 24, pg);
    std::memcpy(img + 32, uuid, 16);
    PutU64(img + 48, mapCommit);
    PutU32(img + 56, digest);
    if (i < trackingFrom) {
      // The bits are read under the lock, where no thread or engine changes them.
      std::memcpy(img + kSlotHeader, p.bits + pg * (payloadBytes / 4), payloadBytes);
    } else {
      uint64_t index = (pg - c.mapPages) % c.trackingPages;
      uint64_t first = index * c.trackingWordsPerPage;
      uint64_t count = std::min<uint64_t>(c.trackingWordsPerPage, c.markedWords - first);
      PutU64(img + kSlotHeader, uint64_t(st[commit_state::kPeriod]));
      uint8_t* words = img + kSlotHeader + kTrackingHeader;
      for (uint64_t w = 0; w < count; w++) PutU32(words + 4 * w, __atomic_load_n(&c.marked[first + w], __ATOMIC_RELAXED));
    }
    PutU32(img + 8, Crc32c(img + 12, bs - 12));
  }
  uint8_t* sb = meta + pages.size() * bs;
  std::memcpy(sb, c.sbImage, bs);
  PutU64(sb + 32, uint64_t(st[commit_state::kGeneration]) + 1);
  PutU64(sb + 192, mapCommit);
  PutU32(sb + 200, digest);
  PutU32(sb + 8, Crc32c(sb + 12, kSuperblockBytes - 12));
  // The steps: the data of every redirect captured completed before it was counted, so before
  // this fdatasync begins; then the pages to their older slots, then the superblock to its
  // older copy, each made durable before the next (commit.ts has why that order is safe).
  auto add = [&](uint8_t kind, uint64_t offset, uint32_t length, uint32_t at) { steps->push_back(Extent{kind, offset, length, at, 0}); };
  add(kSync, 0, 0, 0);
  for (size_t i = 0; i < pages.size(); i++) {
    uint64_t slot = 1 - c.slot[pages[i]];
    add(kMeta, c.mapOffset + (2 * pages[i] + slot) * bs, uint32_t(bs), uint32_t(i * bs));
  }
  add(kSync, 0, 0, 0);
  add(kMeta, (1 - uint64_t(st[commit_state::kSbCopy])) * bs, uint32_t(bs), uint32_t(pages.size() * bs));
  add(kSync, 0, 0, 0);
  for (size_t i = 0; i + 3 < redirected_.size(); i += 4) redirected_[i + 3] = 1;
  captured_ = Captured{std::move(pages), trackingFrom, mapCommit, digest, journalLength_, meta};
  committing_ = true;
  __atomic_store_n(const_cast<int32_t*>(&p.words[published::kNativeCommit]), 1, __ATOMIC_SEQ_CST);
  return true;
}

bool Redirector::CommitDone(const Published& p, int error) {
  auto* words = const_cast<int32_t*>(p.words);
  std::unique_lock<std::timed_mutex> lock(mu_, std::defer_lock);
  if (!lock.try_lock_for(kEngineWait)) {
    // The engine held the lock for 10 s: it is stuck, and waits for this commit in vain; it
    // reports the commit as not finished when its own wait runs out.
    return false;
  }
  if (!committing_) return false;
  CommitSetup& c = setup_;
  double* st = c.state;
  committing_ = false;
  if (error != 0) {
    commitFailed_ = true;
    st[commit_state::kFailed] = error;
    return __atomic_exchange_n(&words[published::kNativeCommit], 0, __ATOMIC_SEQ_CST) == 2;
  }
  const Captured& k = captured_;
  const uint64_t bs = c.blockSize;
  for (uint64_t pg : k.pages) {
    c.slot[pg] = uint8_t(1 - c.slot[pg]);
    c.sequence[pg] += 1;
    c.slotCommit[pg] = double(k.mapCommit);
  }
  st[commit_state::kNextCommit] = double(k.mapCommit + 1);
  st[commit_state::kGeneration] += 1;
  st[commit_state::kMapCommit] = double(k.mapCommit);
  st[commit_state::kDigest] = double(k.digest);
  st[commit_state::kSbCopy] = 1 - st[commit_state::kSbCopy];
  std::memcpy(c.sbImage, k.images + k.pages.size() * bs, bs);
  // The marks the tracking pages hold are durable now: writes in place to those chunks need no
  // commit of their own (ChangeTracking.committed does the same for the engine's commits).
  if (p.trackBits) {
    auto* durable = const_cast<uint32_t*>(p.trackBits);
    for (size_t i = k.trackingFrom; i < k.pages.size(); i++) {
      uint64_t first = ((k.pages[i] - c.mapPages) % c.trackingPages) * c.trackingWordsPerPage;
      const uint8_t* bits = k.images + i * bs + kSlotHeader + kTrackingHeader;
      for (uint64_t w = 0; w < c.trackingWordsPerPage && first + w < p.trackWords; w++) {
        uint32_t v;
        std::memcpy(&v, bits + 4 * w, 4);
        if (v) __atomic_fetch_or(&durable[first + w], v, __ATOMIC_SEQ_CST);
      }
    }
  }
  st[commit_state::kDone] += 1;
  st[commit_state::kJournalMark] = double(k.journalMark);
  bool waits = __atomic_exchange_n(&words[published::kNativeCommit], 0, __ATOMIC_SEQ_CST) == 2;
  // Nothing left to commit (the engine allowed this commit, so it had nothing of its own; no
  // thread redirected anything since): a flush may be fast again.
  bool left = false;
  for (size_t i = 0; i + 3 < redirected_.size(); i += 4) left = left || redirected_[i + 3] == 0;
  if (!left && commitAllowed_ && __atomic_load_n(&words[published::kCommitPending], __ATOMIC_SEQ_CST) != 0) {
    __atomic_store_n(&words[published::kCommitPending], 0, __ATOMIC_SEQ_CST);
    __atomic_add_fetch(&words[published::kGeneration], 1, __ATOMIC_SEQ_CST);
  }
  return waits;
}

namespace {

template <typename T>
T* ArrayOf(const Napi::Object& o, const char* name, napi_typedarray_type type, size_t* length,
           std::vector<Napi::Reference<Napi::TypedArray>>* refs) {
  Napi::Value v = o.Get(name);
  if (v.IsNull() || v.IsUndefined()) return nullptr;
  if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != type) {
    throw Napi::TypeError::New(o.Env(), std::string("configureCommit: ") + name + " has the wrong type");
  }
  Napi::TypedArray a = v.As<Napi::TypedArray>();
  refs->push_back(Napi::Persistent(a));
  *length = a.ElementLength();
  return reinterpret_cast<T*>(static_cast<uint8_t*>(a.ArrayBuffer().Data()) + a.ByteOffset());
}

}  // namespace

Napi::Value Redirector::ConfigureCommit(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!held_) throw Napi::Error::New(env, "configureCommit: the map lock is not held");
  Napi::Object o = info[0].As<Napi::Object>();
  CommitSetup c;
  size_t slots = 0, sequences = 0, commits = 0, fields = 0, sbBytes = 0;
  c.slot = ArrayOf<uint8_t>(o, "slot", napi_uint8_array, &slots, &c.refs);
  c.sequence = ArrayOf<double>(o, "sequence", napi_float64_array, &sequences, &c.refs);
  c.slotCommit = ArrayOf<double>(o, "slotCommit", napi_float64_array, &commits, &c.refs);
  c.state = ArrayOf<double>(o, "state", napi_float64_array, &fields, &c.refs);
  c.sbImage = ArrayOf<uint8_t>(o, "superblock", napi_uint8_array, &sbBytes, &c.refs);
  c.marked = ArrayOf<uint32_t>(o, "marked", napi_uint32_array, &c.markedWords, &c.refs);
  c.blockSize = o.Get("blockSize").ToNumber().Uint32Value();
  c.mapOffset = uint64_t(o.Get("mapOffset").ToNumber().DoubleValue());
  c.mapPages = uint64_t(o.Get("mapPages").ToNumber().DoubleValue());
  c.trackingPages = uint64_t(o.Get("trackingPages").ToNumber().DoubleValue());
  c.trackingWordsPerPage = o.Get("trackingBitsPerPage").ToNumber().Uint32Value() / 32;
  c.pages = slots;
  if (!c.slot || !c.sequence || !c.slotCommit || !c.state || !c.sbImage || sequences != slots || commits != slots ||
      fields < commit_state::kFields || c.blockSize < kSuperblockBytes || sbBytes != c.blockSize ||
      slots != c.mapPages + 2 * c.trackingPages || (c.trackingPages > 0) != (c.marked != nullptr) ||
      (c.marked && c.trackingWordsPerPage == 0)) {
    throw Napi::RangeError::New(env, "configureCommit: the arrays do not agree with the layout");
  }
  setup_ = std::move(c);
  return env.Undefined();
}

Napi::Value Redirector::CaptureCommitJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Published pub;
  std::string error = ReadPublication(info[0].As<Napi::Object>(), &pub);
  if (!error.empty()) throw Napi::Error::New(env, "captureCommit: " + error);
  if (!info[1].IsTypedArray() || info[1].As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array) {
    throw Napi::TypeError::New(env, "captureCommit: meta must be a Uint8Array");
  }
  if (held_) return env.Null();
  Napi::Uint8Array meta = info[1].As<Napi::Uint8Array>();
  std::vector<Extent> steps;
  if (!CaptureCommit(pub, meta.Data(), meta.ByteLength(), &steps)) return env.Null();
  return ExtentRecords(env, steps);
}

Napi::Value Redirector::CommitDoneJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Published pub;
  std::string error = ReadPublication(info[0].As<Napi::Object>(), &pub);
  if (!error.empty()) throw Napi::Error::New(env, "commitDone: " + error);
  if (held_) throw Napi::Error::New(env, "commitDone: the map lock is held");
  return Napi::Boolean::New(env, CommitDone(pub, info[1].ToNumber().Int32Value()));
}

}  // namespace cldd
