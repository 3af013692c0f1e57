// Small system calls the daemon needs and Node lacks: sd_notify(3)'s datagram to systemd,
// FIFREEZE / FITHAW on a mounted filesystem, giving a buffer's pages back (madvise), the
// process's memory settings (prctl, mallopt), and who holds a file open (a scan of /proc).
//
// freeze() and thaw() run on the libuv thread pool: FIFREEZE writes back the filesystem's dirty
// data and waits for it, and that I/O reaches the master device, whose queues this process
// serves on its main thread. Issued from the main thread, the ioctl would wait for itself.
#include "system.h"

#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <malloc.h>
#include <linux/fs.h>
#include <stddef.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

namespace cldd {
namespace {

// Sends `message` to the unix datagram socket `path` ('@' starts an abstract name).
Napi::Value Notify(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 2 || !info[0].IsString() || !info[1].IsString()) {
    throw CodeError(env, "EINVAL", "notify(socket, message): two strings expected");
  }
  std::string path = info[0].As<Napi::String>();
  std::string message = info[1].As<Napi::String>();
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(addr.sun_path)) {
    throw CodeError(env, "EINVAL", "sd_notify: bad NOTIFY_SOCKET \"" + path + "\"");
  }
  memcpy(addr.sun_path, path.data(), path.size());
  socklen_t length = offsetof(sockaddr_un, sun_path) + path.size();
  if (path[0] == '@') addr.sun_path[0] = '\0';  // abstract namespace: no terminating NUL counts
  else length += 1;
  Fd fd(socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  if (!fd.valid()) throw ErrnoError(env, errno, "sd_notify: socket");
  if (sendto(fd.get(), message.data(), message.size(), MSG_NOSIGNAL, reinterpret_cast<sockaddr*>(&addr), length) < 0) {
    throw ErrnoError(env, errno, "sd_notify to " + path);
  }
  return env.Undefined();
}

class FreezeWorker : public Napi::AsyncWorker {
 public:
  FreezeWorker(Napi::Env env, std::string path, bool freeze)
      : Napi::AsyncWorker(env), deferred_(Napi::Promise::Deferred::New(env)), path_(std::move(path)), freeze_(freeze) {}

  Napi::Promise Promise() { return deferred_.Promise(); }

  void Execute() override {
    Fd fd(open(path_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    if (!fd.valid()) {
      err_ = errno;
      return;
    }
    if (ioctl(fd.get(), freeze_ ? FIFREEZE : FITHAW, 0) < 0) err_ = errno;
  }

  void OnOK() override {
    if (err_ == 0) {
      deferred_.Resolve(Env().Undefined());
      return;
    }
    std::string what = std::string(freeze_ ? "freeze " : "thaw ") + path_;
    deferred_.Reject(ErrnoError(Env(), err_, what).Value());
  }

 private:
  Napi::Promise::Deferred deferred_;
  std::string path_;
  bool freeze_;
  int err_ = 0;
};

Napi::Value FreezeOrThaw(const Napi::CallbackInfo& info, bool freeze) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsString()) throw CodeError(env, "EINVAL", "a mountpoint path is expected");
  auto* worker = new FreezeWorker(env, info[0].As<Napi::String>(), freeze);
  Napi::Promise promise = worker->Promise();
  worker->Queue();
  return promise;
}

// releasePages(bytes): the whole pages inside `bytes` go back to the kernel (MADV_DONTNEED): they
// hold no memory until written again, and read as zeros. Returns how many bytes that was. Only
// for an array that is its whole buffer, so no one else's bytes share those pages.
Napi::Value ReleasePages(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsTypedArray()) throw CodeError(env, "EINVAL", "releasePages(bytes): a Uint8Array is expected");
  Napi::TypedArray array = info[0].As<Napi::TypedArray>();
  Napi::ArrayBuffer buffer = array.ArrayBuffer();
  if (array.ByteOffset() != 0 || array.ByteLength() != buffer.ByteLength()) {
    throw CodeError(env, "EINVAL", "releasePages(bytes): the array must be its whole buffer");
  }
  const uintptr_t page = uintptr_t(::sysconf(_SC_PAGESIZE));
  const uintptr_t start = reinterpret_cast<uintptr_t>(buffer.Data());
  const uintptr_t from = (start + page - 1) & ~(page - 1);
  const uintptr_t to = (start + array.ByteLength()) & ~(page - 1);
  if (to <= from) return Napi::Number::New(env, 0);
  if (::madvise(reinterpret_cast<void*>(from), to - from, MADV_DONTNEED) < 0) throw ErrnoError(env, errno, "releasePages");
  return Napi::Number::New(env, double(to - from));
}

// disableHugePages(): no transparent huge pages for this process from now on, nor for its
// children (PR_SET_THP_DISABLE; the pages already huge stay so).
Napi::Value DisableHugePages(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (::prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) < 0) throw ErrnoError(env, errno, "prctl(PR_SET_THP_DISABLE)");
  return env.Undefined();
}

// fixMmapThreshold(bytes): malloc serves every allocation of `bytes` or more with a mapping of
// its own, which goes back to the kernel when freed. Setting it turns off glibc's moving
// threshold, which rises to the size of each large block freed (up to 32 MiB) and with it the
// free space the heap keeps before giving any back.
Napi::Value FixMmapThreshold(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  double bytes = info.Length() < 1 || !info[0].IsNumber() ? -1 : info[0].As<Napi::Number>().DoubleValue();
  // glibc refuses more than HEAP_MAX_SIZE / 2 (32 MiB on 64-bit).
  if (!(bytes >= 0 && bytes <= (32 << 20) && bytes == double(int(bytes)))) {
    throw CodeError(env, "EINVAL", "fixMmapThreshold(bytes): a whole number of bytes up to 32 MiB is expected");
  }
  if (::mallopt(M_MMAP_THRESHOLD, int(bytes)) != 1) throw CodeError(env, "EINVAL", "mallopt(M_MMAP_THRESHOLD) refused " + std::to_string(int(bytes)));
  return env.Undefined();
}

// openersOf(path): the processes other than this one with `path` open, as fuser finds them: every
// /proc/PID/fd link whose target reads exactly `path`. On a thread of libuv's pool, in one pass.
// The same scan with Node's fs calls made a pool round trip per process and per link: 125-173 ms
// of every disable in the 7.3 TCG VM (about 150 processes, most of them kernel threads), half
// the time from the command to the start of the resync; 25-38 ms this way, the mount check
// included (three rounds each).
class OpenersWorker : public Napi::AsyncWorker {
 public:
  OpenersWorker(Napi::Env env, std::string path)
      : Napi::AsyncWorker(env), deferred_(Napi::Promise::Deferred::New(env)), path_(std::move(path)) {}

  Napi::Promise Promise() { return deferred_.Promise(); }

  void Execute() override {
    DIR* proc = ::opendir("/proc");
    if (!proc) {
      err_ = errno;
      return;
    }
    const pid_t self = ::getpid();
    char target[PATH_MAX + 1];
    while (dirent* entry = ::readdir(proc)) {
      pid_t pid = 0;
      const char* c = entry->d_name;
      for (; *c >= '0' && *c <= '9' && pid < 1 << 24; c++) pid = pid * 10 + (*c - '0');
      if (*c || pid <= 0 || pid == self) continue;
      std::string dir = "/proc/" + std::string(entry->d_name);
      int fdDir = ::open((dir + "/fd").c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
      if (fdDir < 0) continue;  // gone, or not ours to see
      DIR* fds = ::fdopendir(fdDir);
      if (!fds) {
        ::close(fdDir);
        continue;
      }
      while (dirent* fd = ::readdir(fds)) {
        if (fd->d_name[0] == '.') continue;
        ssize_t n = ::readlinkat(fdDir, fd->d_name, target, sizeof target);
        if (n < 0 || size_t(n) != path_.size() || memcmp(target, path_.data(), path_.size()) != 0) continue;
        openers_.emplace_back(pid, Command(dir));
        break;
      }
      ::closedir(fds);
    }
    ::closedir(proc);
  }

  void OnOK() override {
    Napi::Env env = Env();
    if (err_) {
      deferred_.Reject(ErrnoError(env, err_, "list the processes in /proc").Value());
      return;
    }
    Napi::Array list = Napi::Array::New(env, openers_.size());
    for (size_t i = 0; i < openers_.size(); i++) {
      Napi::Object o = Napi::Object::New(env);
      o.Set("pid", Napi::Number::New(env, openers_[i].first));
      o.Set("command", Napi::String::New(env, openers_[i].second));
      list.Set(uint32_t(i), o);
    }
    deferred_.Resolve(list);
  }

 private:
  // The process's command name (/proc/PID/comm), or "?" when it cannot be read.
  static std::string Command(const std::string& dir) {
    Fd fd(::open((dir + "/comm").c_str(), O_RDONLY | O_CLOEXEC));
    char name[64];
    ssize_t n = fd.valid() ? ::read(fd.get(), name, sizeof name) : -1;
    if (n <= 0) return "?";
    while (n > 0 && (name[n - 1] == '\n' || name[n - 1] == ' ')) n--;
    return std::string(name, size_t(n));
  }

  Napi::Promise::Deferred deferred_;
  std::string path_;
  std::vector<std::pair<pid_t, std::string>> openers_;
  int err_ = 0;
};

Napi::Value OpenersOf(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsString()) throw CodeError(env, "EINVAL", "openersOf(path): a path is expected");
  std::string path = info[0].As<Napi::String>();
  if (path.empty() || path.size() > PATH_MAX) throw CodeError(env, "EINVAL", "openersOf(path): a path of 1 to PATH_MAX bytes is expected");
  auto* worker = new OpenersWorker(env, std::move(path));
  Napi::Promise promise = worker->Promise();
  worker->Queue();
  return promise;
}

}  // namespace

void DefineSystem(Napi::Env env, Napi::Object exports) {
  exports.Set("notify", Napi::Function::New(env, Notify, "notify"));
  exports.Set("freeze", Napi::Function::New(env, [](const Napi::CallbackInfo& info) { return FreezeOrThaw(info, true); }, "freeze"));
  exports.Set("releasePages", Napi::Function::New(env, ReleasePages, "releasePages"));
  exports.Set("thaw", Napi::Function::New(env, [](const Napi::CallbackInfo& info) { return FreezeOrThaw(info, false); }, "thaw"));
  exports.Set("disableHugePages", Napi::Function::New(env, DisableHugePages, "disableHugePages"));
  exports.Set("fixMmapThreshold", Napi::Function::New(env, FixMmapThreshold, "fixMmapThreshold"));
  exports.Set("openersOf", Napi::Function::New(env, OpenersOf, "openersOf"));
}

}  // namespace cldd
