// The backing store: one fd, with every read, write, fdatasync and fallocate going through one
// io_uring, but for a commit's ordered steps (sequence(): blocking calls on a worker thread, one
// after another). The engine's metadata I/O and the ublk queues' data I/O share one file and one
// ordering story: a flush covers every write that completed before it, whichever thread ran it.
#pragma once

#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "common.h"

namespace cldd {

class Store : public Napi::ObjectWrap<Store> {
 public:
  static Napi::Function Define(Napi::Env env);
  explicit Store(const Napi::CallbackInfo& info);
  ~Store() override;

 private:
  struct Job;
  struct Part;
  struct Record;
  struct Span;
  struct CopyRun;
  // A merge's copy buffer where its runs do not fit it: pieces go through it in turn.
  struct Bounce {
    uint8_t* data = nullptr;
    uint64_t length = 0;
  };

  Napi::Value Size(const Napi::CallbackInfo& info);
  Napi::Value IsBlockDevice(const Napi::CallbackInfo& info);
  Napi::Value FdValue(const Napi::CallbackInfo& info);
  Napi::Value Read(const Napi::CallbackInfo& info);
  Napi::Value Write(const Napi::CallbackInfo& info);
  Napi::Value Zero(const Napi::CallbackInfo& info);
  Napi::Value Flush(const Napi::CallbackInfo& info);
  Napi::Value Run(const Napi::CallbackInfo& info);
  Napi::Value Sequence(const Napi::CallbackInfo& info);
  Napi::Value Copy(const Napi::CallbackInfo& info);
  Napi::Value PunchesHoles(const Napi::CallbackInfo& info);
  Napi::Value Close(const Napi::CallbackInfo& info);

  void CheckOpen(Napi::Env env, const char* op);
  std::vector<Record> ReadRecords(const Napi::CallbackInfo& info, const char* op, bool (*fits)(double, double, double, double));
  Job* NewJob(Napi::Env env, Napi::Value keep, std::string what);
  void AddPart(Job* job, uint8_t kind, uint8_t* data, uint64_t offset, uint64_t length);
  bool Queue(Part* part);
  Napi::Value Launch(Napi::Env env, Job* job);
  Napi::Value QueueSequence(Napi::Env env, Napi::Value keep, const char* op, std::vector<Record> steps, std::vector<CopyRun> runs,
                            Bounce bounce);
  void OnCompletions();
  void PartDone(Part* part, int err);
  void Release(Job* job);
  void FinishClose();
  void Shutdown();

  class SequenceWorker;

  std::string path_;
  Fd fd_;
  Ring ring_;
  uint64_t size_ = 0;
  bool blockDevice_ = false;
  bool closed_ = false;
  // copy_file_range works here: cleared for the store's life by the first copy it refuses.
  std::atomic<bool> copiesInKernel_{true};
  size_t jobs_ = 0;
  std::vector<Napi::Promise::Deferred> closeWaiters_;
  std::unique_ptr<Napi::AsyncContext> context_;
  CleanupHook cleanup_;
};

}  // namespace cldd
