#include "redirector.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>

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
                      InstanceMethod<&Redirector::RedirectJs>("redirect")});
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

}  // namespace cldd
