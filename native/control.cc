#include "control.h"

#include <fcntl.h>

#include <cerrno>
#include <cstring>

#include "ublk.h"

namespace cldd {

namespace {
// The user_data of cancel requests: never a Pending's address.
constexpr uint64_t kCancelData = 1;
}  // namespace

struct Control::Pending {
  Napi::Promise::Deferred deferred;
  Napi::Reference<Napi::Value> keep;  // the command's buffer, written by the kernel
  std::string what;
  uint32_t token = 0;  // 0: none
  explicit Pending(Napi::Env env) : deferred(Napi::Promise::Deferred::New(env)) {}
};

Napi::Function Control::Define(Napi::Env env) {
  return DefineClass(env, "Control",
                     {InstanceMethod<&Control::Command>("command"), InstanceMethod<&Control::Cancel>("cancel"),
                      InstanceMethod<&Control::Close>("close")});
}

Control::Control(const Napi::CallbackInfo& info) : Napi::ObjectWrap<Control>(info) {
  Napi::Env env = info.Env();
  fd_.Reset(::open("/dev/ublk-control", O_RDWR | O_CLOEXEC));
  if (!fd_.valid()) {
    int err = errno;
    if (err == ENOENT || err == ENODEV || err == ENXIO) {
      throw CodeError(env, "ENODEV", "the kernel's ublk driver is not loaded (modprobe ublk_drv; needs Linux 6.0+)");
    }
    throw ErrnoError(env, err, "open /dev/ublk-control");
  }
  ring_.Init(env, 16, IORING_SETUP_SQE128, "ublk control");
  context_ = std::make_unique<Napi::AsyncContext>(env, "cldd:ublk-control");
  ring_.Watch([this] { OnCompletions(); });
  cleanup_.Add(env, [](void* self) { static_cast<Control*>(self)->Shutdown(); }, this);
}

void Control::Shutdown() {
  ring_.Close();
  fd_.Reset();
}

// command(cmdOp, devId, queueId, data0, buffer | null, name, token?)
Napi::Value Control::Command(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto cmdOp = info[0].As<Napi::Number>().Uint32Value();
  auto devId = info[1].As<Napi::Number>().Uint32Value();
  auto queueId = info[2].As<Napi::Number>().Uint32Value();
  auto data0 = uint64_t(info[3].As<Napi::Number>().Int64Value());
  std::string name = info[5].As<Napi::String>().Utf8Value();
  if (!ring_.open()) throw CodeError(env, "CLDD_CLOSED", name + ": the ublk control handle is closed");
  auto* pending = new Pending(env);
  pending->what = name;
  if (info.Length() > 6 && info[6].IsNumber()) pending->token = info[6].As<Napi::Number>().Uint32Value();
  CtrlCmd cmd{};
  cmd.dev_id = devId;
  cmd.queue_id = uint16_t(queueId);
  cmd.data0 = data0;
  if (info[4].IsTypedArray()) {
    Napi::TypedArray array = info[4].As<Napi::TypedArray>();
    cmd.addr = reinterpret_cast<uintptr_t>(static_cast<uint8_t*>(array.ArrayBuffer().Data()) + array.ByteOffset());
    cmd.len = uint16_t(array.ByteLength());
    pending->keep = Napi::Persistent(info[4]);
  }
  io_uring_sqe* sqe = ring_.Sqe();
  if (!sqe) {
    delete pending;
    throw CodeError(env, "EAGAIN", name + ": the ublk control ring is full");
  }
  // liburing 2.3 has no URING_CMD helper: a zeroed SQE with the opcode and command filled in.
  std::memset(sqe, 0, 2 * sizeof(io_uring_sqe));
  sqe->opcode = IORING_OP_URING_CMD;
  sqe->fd = fd_.get();
  sqe->cmd_op = cmdOp;
  std::memcpy(sqe->cmd, &cmd, sizeof cmd);
  io_uring_sqe_set_data(sqe, pending);
  int rc = ring_.Submit();
  if (rc < 0) {
    // The SQE stays queued in the ring; it goes with the next submit, so the promise stands.
    if (rc != -EAGAIN && rc != -EBUSY && rc != -EINTR) {
      throw ErrnoError(env, -rc, name + ": submit");
    }
  }
  pending_++;
  if (pending->token) byToken_[pending->token] = pending;
  ring_.SetRef(true);
  return pending->deferred.Promise();
}

// cancel(token): asks the kernel to cancel the command sent with `token`. Returns false when no
// such command is pending (it completed already); else its promise settles as the kernel decides:
// rejected with EINTR (or ECANCELED) when the cancel reached it, resolved if it finished first.
Napi::Value Control::Cancel(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto token = info[0].As<Napi::Number>().Uint32Value();
  auto it = byToken_.find(token);
  if (it == byToken_.end() || !ring_.open()) return Napi::Boolean::New(env, false);
  io_uring_sqe* sqe = ring_.Sqe();
  if (!sqe) throw CodeError(env, "EAGAIN", it->second->what + ": cancel: the ublk control ring is full");
  std::memset(sqe, 0, 2 * sizeof(io_uring_sqe));
  io_uring_prep_cancel64(sqe, reinterpret_cast<uintptr_t>(it->second), 0);
  sqe->user_data = kCancelData;
  int rc = ring_.Submit();
  if (rc < 0 && rc != -EAGAIN && rc != -EBUSY && rc != -EINTR) throw ErrnoError(env, -rc, it->second->what + ": cancel");
  return Napi::Boolean::New(env, true);
}

Napi::Value Control::Close(const Napi::CallbackInfo& info) {
  Shutdown();
  return info.Env().Undefined();
}

void Control::OnCompletions() {
  Napi::Env env = Env();
  RunFromLoop(env, *context_, [&] {
    io_uring_cqe* cqe;
    while (ring_.open() && io_uring_peek_cqe(ring_.get(), &cqe) == 0) {
      if (cqe->user_data == kCancelData) {
        // The cancel's own answer (0, -ENOENT, -EALREADY): the command's completion says the rest.
        io_uring_cqe_seen(ring_.get(), cqe);
        continue;
      }
      auto* pending = static_cast<Pending*>(io_uring_cqe_get_data(cqe));
      int res = cqe->res;
      io_uring_cqe_seen(ring_.get(), cqe);
      if (pending->token) byToken_.erase(pending->token);
      if (res >= 0) {
        pending->deferred.Resolve(Napi::Number::New(env, res));
      } else if (res == -524) {
        // ENOTSUPP, the kernel-internal "unknown command" of kernels before 6.4.
        pending->deferred.Reject(CodeError(env, "EOPNOTSUPP", pending->what + ": not supported by this kernel").Value());
      } else {
        pending->deferred.Reject(ErrnoError(env, -res, pending->what).Value());
      }
      delete pending;
      if (--pending_ == 0) ring_.SetRef(false);
    }
  });
}

}  // namespace cldd
