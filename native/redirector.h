// A first touch in a snapshot, redirected by the queue thread that wrote it: the redirect bits,
// the map journal's record, and `commitPending`, set in the order rule 4 of docs/serving.md
// gives, under a lock the engine takes whenever it reads or changes the map's bookkeeping (its
// commit's capture, its own map changes, the journal's trim). The engine learns of each such
// redirect at its next hold(), and marks the chunks and pages they dirtied before it captures
// anything. Without this, each first touch waited for a round trip through the Node main thread.
#pragma once

#include <napi.h>

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <vector>

namespace cldd {

struct Published;

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

 private:
  // hold(): takes the lock (bounded) and returns [journal length, start, end, set, ...], the
  // ranges redirected here since the last hold (and how many of each range's bits were clear),
  // which it forgets; null when there are none. release(journalFd, journalLength, enabled):
  // where the journal is now, and whether first touches may be redirected here; drops the lock.
  // redirect(publication, ranges): Redirect, for the engine's tests.
  Napi::Value Hold(const Napi::CallbackInfo& info);
  Napi::Value Release(const Napi::CallbackInfo& info);
  Napi::Value RedirectJs(const Napi::CallbackInfo& info);

  std::timed_mutex mu_;
  // Guarded by mu_.
  bool held_ = false;
  bool enabled_ = false;
  int journalFd_ = -1;
  uint64_t journalLength_ = 0;
  std::vector<double> redirected_;
  std::vector<uint8_t> records_;
};

}  // namespace cldd
