// /dev/ublk-control and its ring. Commands are generic here (opcode, device, queue, one inline
// word, one buffer); what they mean, and which opcode encoding the kernel takes, is decided in
// src/ublk/control.ts. The driver runs control commands from an io_uring worker, so awaiting
// START_DEV or END_USER_RECOVERY never blocks the thread that serves the queues; cancelling one
// (an io_uring async cancel) interrupts that worker's wait, and the command fails with EINTR.
#pragma once

#include <memory>
#include <unordered_map>

#include "common.h"

namespace cldd {

class Control : public Napi::ObjectWrap<Control> {
 public:
  static Napi::Function Define(Napi::Env env);
  explicit Control(const Napi::CallbackInfo& info);
  ~Control() override { Shutdown(); }

 private:
  struct Pending;
  Napi::Value Command(const Napi::CallbackInfo& info);
  Napi::Value Cancel(const Napi::CallbackInfo& info);
  Napi::Value Close(const Napi::CallbackInfo& info);
  void OnCompletions();
  void Shutdown();

  Fd fd_;
  Ring ring_;
  size_t pending_ = 0;
  // Commands sent with a token, by token, for cancel().
  std::unordered_map<uint32_t, Pending*> byToken_;
  std::unique_ptr<Napi::AsyncContext> context_;
  CleanupHook cleanup_;
};

}  // namespace cldd
