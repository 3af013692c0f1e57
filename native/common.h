// Shared pieces of the addon: errno errors for JS, RAII for fds and mappings, and an io_uring
// owned by the Node main thread and woken through libuv.
//
// Why liburing (Debian's liburing-dev 2.3, linked statically) rather than raw syscalls: it gives
// tested ring setup, SQ/CQ bookkeeping and memory barriers for free; the two things 2.3 lacks
// (URING_CMD preparation and the ublk command payloads) are filled by hand in ublk_cmd.h.
#pragma once

#include <liburing.h>
#include <napi.h>
#include <uv.h>

#include <cstdint>
#include <functional>
#include <string>

namespace cldd {

// A JS Error whose `code` is Node's name for the errno (ENOENT, EBUSY, ...) and whose message
// names the operation that failed.
Napi::Error ErrnoError(Napi::Env env, int err, const std::string& what);
Napi::Error CodeError(Napi::Env env, const char* code, const std::string& message);
std::string ErrnoMessage(int err, const std::string& what);
const char* ErrnoName(int err);

class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() { Reset(); }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  void Reset(int fd = -1);

 private:
  int fd_ = -1;
};

class Mapping {
 public:
  Mapping() = default;
  ~Mapping() { Reset(); }
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  // Returns 0 or an errno.
  int Map(size_t length, int prot, int flags, int fd, off_t offset);
  void Reset();
  uint8_t* data() const { return static_cast<uint8_t*>(addr_); }
  size_t size() const { return length_; }

 private:
  void* addr_ = nullptr;
  size_t length_ = 0;
};

// An io_uring whose completions wake the Node event loop: a uv_poll on the ring fd, which is
// readable while completions wait. Every submission comes from the main thread, so the ring has
// one submitter and, for ublk, that thread is the daemon task of every queue it serves.
class Ring {
 public:
  Ring() = default;
  ~Ring() { Close(); }
  Ring(const Ring&) = delete;
  Ring& operator=(const Ring&) = delete;

  // Throws a JS Error (EPERM explains kernel.io_uring_disabled). A kernel that refuses `flags`
  // (EINVAL: a setup flag it does not know) gets `fallbackFlags`, when they differ.
  void Init(Napi::Env env, unsigned entries, unsigned flags, const std::string& what, unsigned fallbackFlags);
  void Init(Napi::Env env, unsigned entries, unsigned flags, const std::string& what) { Init(env, entries, flags, what, flags); }
  // Starts calling `onReady` from the event loop whenever completions wait.
  void Watch(std::function<void()> onReady);
  // Whether the ring keeps the process alive (only while it has work outstanding).
  void SetRef(bool ref);
  void Close();
  bool open() const { return open_; }
  io_uring* get() { return &ring_; }
  // An SQE, submitting the queued ones first when the SQ is full; null only when that submit
  // fails (the kernel refused the ring's entries).
  io_uring_sqe* Sqe();
  // Returns what io_uring_submit returns.
  int Submit() { return io_uring_submit(&ring_); }

 private:
  static void OnPoll(uv_poll_t* handle, int status, int events);
  io_uring ring_{};
  bool open_ = false;
  bool ref_ = false;
  uv_poll_t* poll_ = nullptr;
  std::function<void()> onReady_;
};

// Closes a libuv handle that was allocated with new (uv_close also stops it) and forgets it; its
// memory belongs to libuv until the close callback, which frees it. Safe on null.
template <typename Handle>
void CloseHandle(Handle*& handle) {
  if (!handle) return;
  handle->data = nullptr;
  uv_close(reinterpret_cast<uv_handle_t*>(handle), [](uv_handle_t* h) { delete reinterpret_cast<Handle*>(h); });
  handle = nullptr;
}

// Calls `fn(arg)` when the Node environment is torn down (worker exit, process exit), unless
// removed first: owners remove it in their destructors so a collected object is never touched.
class CleanupHook {
 public:
  CleanupHook() = default;
  ~CleanupHook() { Remove(); }
  CleanupHook(const CleanupHook&) = delete;
  CleanupHook& operator=(const CleanupHook&) = delete;
  void Add(napi_env env, void (*fn)(void*), void* arg);
  void Remove();

 private:
  napi_env env_ = nullptr;
  void (*fn_)(void*) = nullptr;
  void* arg_ = nullptr;
};

// Runs `fn` inside a handle scope and a callback scope (so promise reactions run when it
// returns); an exception escaping JS becomes Node's uncaught exception.
void RunFromLoop(Napi::Env env, Napi::AsyncContext& context, const std::function<void()>& fn);

}  // namespace cldd
