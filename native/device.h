// The serving side of one ublk device: /dev/ublkcN, each queue's descriptor mapping, per-tag
// I/O buffers and one io_uring per queue that carries the ublk commands, the backing file's
// discards and uncached reads, and with zero copy its large reads and writes (small writes and
// cached reads are direct calls: see QueueExtent in device.cc).
// Every queue is served from the Node main thread (see src/ublk/device.ts for why): it issues
// every FETCH_REQ and every later command, so it is the daemon task of all queues.
//
// Per tag: the kernel hands a request over (FETCH completes) -> the engine plans it -> the
// plan's extents run here -> either the tag is committed at once (the engine is told after, in
// a batch) or, for plans that need ordering, the engine is told first and commits through
// complete(). Only plans, never extents, cross into JS.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "common.h"

namespace cldd {

class Device : public Napi::ObjectWrap<Device> {
 public:
  static Napi::Function Define(Napi::Env env);
  explicit Device(const Napi::CallbackInfo& info);
  ~Device() override { Shutdown(); }

 private:
  struct Extent {
    uint8_t kind;
    uint64_t offset;
    uint32_t length;
    uint32_t bufferOffset;
    uint32_t done;
  };
  // The numbers are read by src/ublk/device.ts (TAG_STATES) through inspect().
  enum class TagState : uint8_t { kIdle, kFetching, kEngine, kRunning, kWaiting, kDead };
  struct Tag {
    TagState state = TagState::kIdle;
    uint8_t op = 0;
    uint32_t bytes = 0;
    bool needsEngine = false;
    uint32_t pending = 0;
    int error = 0;
    std::vector<Extent> extents;
  };
  struct Queue {
    uint16_t id = 0;
    Ring ring;
    Mapping descriptors;
    Mapping buffers;
    std::vector<Tag> tags;
    uint32_t live = 0;
    uint32_t backingInFlight = 0;
    bool started = false;
    // Inside Serve: its loop delivers what JS's submits and completions leave behind.
    bool serving = false;
    std::vector<double> requests;
    std::vector<int32_t> ordered;
    std::vector<int32_t> done;
  };

  Napi::Value Start(const Napi::CallbackInfo& info);
  Napi::Value Submit(const Napi::CallbackInfo& info);
  Napi::Value Complete(const Napi::CallbackInfo& info);
  Napi::Value Close(const Napi::CallbackInfo& info);
  Napi::Value Inspect(const Napi::CallbackInfo& info);
  Napi::Value LastError(const Napi::CallbackInfo& info);
  static void OnDeliverTimer(uv_timer_t* timer);

  Queue& QueueArg(Napi::Env env, const Napi::Value& value);
  void QueueCommand(Queue& q, uint16_t tag, uint32_t op, int32_t result);
  void QueueExtent(Queue& q, uint16_t tag, uint16_t index);
  int CopyRequest(Queue& q, uint16_t tag, uint32_t within, uint8_t* mem, uint32_t length, bool toRequest);
  void Commit(Queue& q, uint16_t tag, int32_t result);
  void OnCompletions(Queue& q);
  void Serve(Queue& q, bool withDone);
  void ScheduleDelivery(Queue& q);
  void DeliverEvents(Queue& q, bool stopped);
  void Reap(Queue& q, bool* stopped);
  std::string ApplySubmit(Queue& q, const double* r, size_t n);
  std::string ApplyComplete(Queue& q, const int32_t* pairs, size_t n);
  void OnCommandCompletion(Queue& q, uint16_t tag, int res, bool* stopped);
  void OnExtentCompletion(Queue& q, uint16_t tag, uint16_t index, int res);
  void ExtentsFinished(Queue& q, uint16_t tag);
  void Shutdown();

  uint32_t devId_ = 0;
  uint32_t depth_ = 0;
  uint32_t bufferBytes_ = 0;
  int backingFd_ = -1;
  bool encode_ = false;
  // Requests' pages are registered in each ring's buffer table (UBLK_F_AUTO_BUF_REG) and this
  // side copies small requests itself (UBLK_F_USER_COPY); see QueueExtent.
  bool zeroCopy_ = false;
  // Cleared when the backing file refuses non-blocking reads; they all go to the ring then.
  bool nowaitReads_ = true;
  Fd charFd_;
  std::vector<std::unique_ptr<Queue>> queues_;
  Napi::FunctionReference onEvents_;
  // The one buffer every delivery to JS goes through (JS reads it inside onEvents, synchronously):
  // requests at [0, 5 x depth), ordered pairs at [5 x depth, 7 x depth), done pairs after that.
  Napi::Reference<Napi::Float64Array> eventsRef_;
  double* events_ = nullptr;
  // Delivers what a queue holds for JS when no ring completion will: completed plans whose
  // finish() is bookkeeping (after kDoneDelayMs, unless a delivery takes them along earlier),
  // and at once whatever direct calls outside Serve, or Serve's round limit, left behind.
  uv_timer_t* deliverTimer_ = nullptr;
  uint64_t timerDue_ = 0;
  std::unique_ptr<Napi::AsyncContext> context_;
  CleanupHook cleanup_;
  std::string lastError_;
};

}  // namespace cldd
