#include "common.h"

#include <sched.h>
#include <time.h>

#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace cldd {

const char* ErrnoName(int err) { return uv_err_name(-err); }

std::string ErrnoMessage(int err, const std::string& what) {
  std::string message = what + ": " + std::strerror(err);
  return message;
}

Napi::Error CodeError(Napi::Env env, const char* code, const std::string& message) {
  Napi::Error error = Napi::Error::New(env, message);
  error.Set("code", Napi::String::New(env, code));
  return error;
}

Napi::Error ErrnoError(Napi::Env env, int err, const std::string& what) {
  Napi::Error error = CodeError(env, ErrnoName(err), ErrnoMessage(err, what));
  error.Set("errno", Napi::Number::New(env, -err));
  return error;
}

void Fd::Reset(int fd) {
  if (fd_ >= 0) ::close(fd_);
  fd_ = fd;
}

int Mapping::Map(size_t length, int prot, int flags, int fd, off_t offset) {
  Reset();
  void* addr = ::mmap(nullptr, length, prot, flags, fd, offset);
  if (addr == MAP_FAILED) return errno;
  addr_ = addr;
  length_ = length;
  return 0;
}

void Mapping::Reset() {
  if (addr_) ::munmap(addr_, length_);
  addr_ = nullptr;
  length_ = 0;
}

void Ring::Init(Napi::Env env, unsigned entries, unsigned flags, const std::string& what, unsigned fallbackFlags) {
  int rc = io_uring_queue_init(entries, &ring_, flags);
  if (rc == -EINVAL && fallbackFlags != flags) rc = io_uring_queue_init(entries, &ring_, flags = fallbackFlags);
  if (rc < 0) {
    if (rc == -EPERM) {
      throw CodeError(env, "EPERM",
                      what + ": io_uring is not permitted (is sysctl kernel.io_uring_disabled set to 1 or 2?)");
    }
    throw ErrnoError(env, -rc, what + ": io_uring setup");
  }
  open_ = true;
  poll_ = new uv_poll_t;
  uv_loop_t* loop = nullptr;
  napi_get_uv_event_loop(env, &loop);
  rc = uv_poll_init(loop, poll_, ring_.ring_fd);
  if (rc < 0) {
    delete poll_;
    poll_ = nullptr;
    io_uring_queue_exit(&ring_);
    open_ = false;
    throw ErrnoError(env, -rc, what + ": uv_poll_init");
  }
  poll_->data = this;
  uv_unref(reinterpret_cast<uv_handle_t*>(poll_));
}

void Ring::Watch(std::function<void()> onReady) {
  onReady_ = std::move(onReady);
  uv_poll_start(poll_, UV_READABLE, &Ring::OnPoll);
}

void Ring::SetRef(bool ref) {
  if (!poll_ || ref == ref_) return;
  ref_ = ref;
  if (ref) uv_ref(reinterpret_cast<uv_handle_t*>(poll_));
  else uv_unref(reinterpret_cast<uv_handle_t*>(poll_));
}

void Ring::OnPoll(uv_poll_t* handle, int status, int) {
  auto* ring = static_cast<Ring*>(handle->data);
  if (ring && status == 0 && ring->onReady_) ring->onReady_();
}

void Ring::Close() {
  CloseHandle(poll_);
  if (open_) {
    io_uring_queue_exit(&ring_);
    open_ = false;
  }
  onReady_ = nullptr;
}

io_uring_sqe* Ring::Sqe() {
  // A full SQ: hand the queued entries to the kernel and take a freed one. The kernel may refuse
  // them for a while (EAGAIN: no memory for requests); past a second the caller gets none, and
  // fails what it wanted to submit, rather than spin on forever.
  timespec start{};
  bool waiting = false;
  for (;;) {
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    if (sqe) return sqe;
    int rc = io_uring_submit(&ring_);
    if (rc < 0 && rc != -EINTR && rc != -EAGAIN) return nullptr;
    if (rc > 0) continue;
    timespec now{};
    clock_gettime(CLOCK_MONOTONIC, &now);
    if (!waiting) {
      waiting = true;
      start = now;
    } else if (now.tv_sec - start.tv_sec > 1) {
      return nullptr;
    }
    sched_yield();
  }
}

void CleanupHook::Add(napi_env env, void (*fn)(void*), void* arg) {
  env_ = env;
  fn_ = fn;
  arg_ = arg;
  napi_add_env_cleanup_hook(env, fn, arg);
}

void CleanupHook::Remove() {
  if (env_) napi_remove_env_cleanup_hook(env_, fn_, arg_);
  env_ = nullptr;
}

void RunFromLoop(Napi::Env env, Napi::AsyncContext& context, const std::function<void()>& fn) {
  Napi::HandleScope scope(env);
  Napi::CallbackScope callbackScope(env, context);
  try {
    fn();
  } catch (const Napi::Error& e) {
    napi_fatal_exception(env, e.Value());
  }
}

}  // namespace cldd
