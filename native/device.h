// The serving side of one ublk device: /dev/ublkcN, each queue's descriptor mapping, per-tag
// I/O buffers (a whole request each, or one segment of one under user copy without zero copy),
// and per queue one native thread that owns the queue's io_uring: it issues every ublk command of
// that queue (so it is the queue's daemon task), blocks in io_uring_enter (submit and wait in one
// call), and runs the backing file's I/O.
//
// Per request, the queue thread first asks the fast path (serving.h): a request whose plan is a
// pure function of what the engine publishes (reads, plain writes, writes to blocks already
// redirected, flushes with nothing to commit) is served there and then, with no JS at all.
// Every other request goes to the engine as before: the kernel hands it over (FETCH completes)
// -> the engine plans it on the Node main thread -> the plan's extents run on the queue thread
// -> either the tag is committed at once (the engine is told after, in a batch) or, for plans
// that need ordering, the engine is told first and commits through complete(). Only plans,
// never extents, cross into JS. Between the threads: a mutex-guarded inbox per queue (JS's plans
// and results, woken through an eventfd read on the ring) and outbox (requests and completions
// for JS, woken through a uv_async). A snapshot write to blocks not yet redirected is run by the
// fast path too, and then redirected by the thread (native/redirector.h), or, when it may not,
// handed to the engine once, to redirect its blocks before it completes.
#pragma once

#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common.h"
#include "serving.h"

namespace cldd {

class Device : public Napi::ObjectWrap<Device> {
 public:
  static Napi::Function Define(Napi::Env env);
  explicit Device(const Napi::CallbackInfo& info);
  ~Device() override { Shutdown(); }

 private:
  struct Tag {
    std::atomic<uint8_t> state{uint8_t(TagState::kIdle)};
    uint8_t op = 0;
    bool needsEngine = false;
    bool fast = false;
    // A fast snapshot write to blocks not all redirected: once its extents are done it waits
    // (kWaiting, still counted in fastInFlight) for the engine to redirect them.
    bool redirect = false;
    // A commit run for a flush (the engine's steps): each extent starts once the one before it
    // completed, and an error skips the rest; `next` is the first not yet started.
    bool inOrder = false;
    // A master flush whose map commit this thread built (CommitHere): served in order like the
    // engine's steps, then reported to the redirector (CommitDone) before it completes.
    bool commitHere = false;
    // A FUA write in a snapshot with something to commit: once its write is done, this thread
    // redirects its blocks (with `redirect`) and builds the commit (CommitAfterWrite), or hands
    // the whole request to the engine.
    bool commitAfter = false;
    uint32_t next = 0;
    uint32_t bytes = 0;
    uint32_t pending = 0;
    int error = 0;
    uint64_t offset = 0;
    // CLOCK_MONOTONIC nanoseconds when the request arrived (for inspect's ages).
    std::atomic<uint64_t> since{0};
    std::vector<Extent> extents;
    // Segmented user copy (segmented_): a read of the backing file into the tag's buffer is in
    // flight on the ring, and the extents that need the ring meanwhile wait here.
    bool bufferBusy = false;
    std::vector<uint16_t> waiting;
    // A fast read chained with its commit (ChainRead): kChainRead while the backing read is in
    // flight, kChainCopy while the copy into the request is; 0 otherwise, and once a step
    // failed (the steps after it come back cancelled and the tag goes on the ordinary way).
    uint8_t chain = 0;
    // Which chain: the steps and the commit carry it, so a cancelled step or commit of a broken
    // chain cannot be taken for one of a later chain on the tag; `broken` is the last that broke.
    uint16_t chainSeq = 0, broken = 0;
    // A flush handed to the engine to commit: the fdatasync its thread ran meanwhile (OwnSync),
    // and that fdatasync's error, which the flush reports whatever the engine answers.
    OwnSync ownSync;
    int ownSyncError = 0;
  };
  // Requests served by the fast path, by kind; added into the engine's counters by device.ts.
  struct Counters {
    std::atomic<uint64_t> reads{0}, writes{0}, flushes{0}, bytesRead{0}, bytesWritten{0}, errors{0};
    // The queue thread's polls before it sleeps (AdaptPoll): polls that new work came to, and
    // polls that ran out. Not requests: `cldd status` shows them on a line of their own.
    std::atomic<uint64_t> pollsCaught{0}, pollsRanOut{0};
  };
  struct Queue {
    uint16_t id = 0;
    int cpu = -1;  // the CPU its thread is pinned to (src/ublk/affinity.ts); -1: not pinned
    Ring ring;
    Mapping descriptors;
    Mapping buffers;
    std::unique_ptr<Tag[]> tags;
    Fd wake;  // eventfd: written by JS's submit/complete and by close; read through the ring
    uint64_t wakeValue = 0;
    std::thread thread;
    // Owned by the queue thread.
    uint32_t live = 0;
    // Requests between their arrival and their commit (see QueueExtent's flushes).
    uint32_t busy = 0;
    // A flush this round handed to the engine to commit, for its own sync (RunOwnSync); -1: none.
    int ownSyncTag = -1;
    bool exiting = false;
    // Polling (Poll): waits left to sleep through without polling, and polls in a row that ran
    // out, which double them.
    uint32_t pollSkip = 0;
    uint32_t pollMisses = 0;
    // Completions reaped that bring work from outside: requests, the engine's answers (AdaptPoll).
    uint64_t arrivals = 0;
    std::vector<double> outRequests;
    std::vector<int32_t> outOrdered;
    std::vector<int32_t> outDone;
    std::vector<double> outRedirects;
    std::vector<uint64_t> ranges;  // RedirectHere's blocks
    std::vector<double> takenSubmits;
    std::vector<int32_t> takenCompletes;
    // Read by inspect() from the main thread.
    std::atomic<uint32_t> backingInFlight{0};
    // Fast-path requests between their decision and the end of their backing I/O: the engine
    // turns the fast path off and waits for this to reach 0 before it changes state.
    std::atomic<uint32_t> fastInFlight{0};
    Counters counters;
    // Guarded by mu: the inbox (JS -> thread) and the outbox (thread -> JS).
    std::mutex mu;
    std::vector<double> submits;
    std::vector<int32_t> completes;
    bool closeRequested = false;
    bool wakePending = false;
    std::vector<double> requests;
    std::vector<int32_t> ordered;
    std::vector<int32_t> done;
    std::vector<double> redirects;
    bool stopped = false;         // every tag is dead: told to JS with the next delivery
    bool stoppedDelivered = false;
    std::string failure;          // why the thread stopped serving early, if it did
  };

  Napi::Value Start(const Napi::CallbackInfo& info);
  Napi::Value Submit(const Napi::CallbackInfo& info);
  Napi::Value Complete(const Napi::CallbackInfo& info);
  Napi::Value Close(const Napi::CallbackInfo& info);
  Napi::Value Inspect(const Napi::CallbackInfo& info);
  Napi::Value FastInFlight(const Napi::CallbackInfo& info);
  Napi::Value Stats(const Napi::CallbackInfo& info);
  Napi::Value LastError(const Napi::CallbackInfo& info);
  static void OnAsync(uv_async_t* handle);

  Queue& QueueArg(Napi::Env env, const Napi::Value& value);
  std::string ValidateSubmit(Queue& q, const double* r, size_t n);
  std::string ValidateComplete(Queue& q, const int32_t* pairs, size_t n);
  void Wake(Queue& q);
  void Deliver();

  // The queue thread.
  void Run(Queue& q);
  void RingFailed(Queue& q, const std::string& why);
  // One wait of the queue thread (Wait): whether it had to wait at all, whether it polled, and
  // whether work came within the poll's time (caught by the poll, or soon after it slept).
  struct PollRound {
    bool waited = false, polled = false, caught = false, soon = false;
  };
  int Wait(Queue& q, uint64_t pollNs, PollRound* round);
  void AdaptPoll(Queue& q, const PollRound& round, bool came);
  bool Poll(Queue& q, uint64_t deadline);
  void RunOwnSync(Queue& q);
  void SyncFailed(Queue& q, uint16_t tag, int err);
  void ArmWake(Queue& q);
  void TakeInbox(Queue& q);
  void RedirectHere(Queue& q);
  void PublishOutbox(Queue& q);
  void QueueCommand(Queue& q, uint16_t tag, uint32_t op, int32_t result, uint64_t userData = 0);
  bool ChainRead(Queue& q, uint16_t tag);
  void OnChainCompletion(Queue& q, uint16_t tag, uint16_t seq, uint16_t step, int res);
  void ChainDone(Queue& q, uint16_t tag);
  void QueueExtent(Queue& q, uint16_t tag, uint16_t index);
  uint8_t* TagBuffer(Queue& q, uint16_t tag) { return q.buffers.data() + size_t(tag) * tagBufferBytes_; }
  // Segmented: what this thread copies from start to end without waiting (a write, a read the
  // page cache holds) goes through one buffer per queue, as large as the largest request.
  uint8_t* Scratch(Queue& q) { return q.buffers.data() + size_t(depth_) * tagBufferBytes_; }
  int CopyRequest(Queue& q, uint16_t tag, uint32_t within, uint8_t* mem, uint32_t length, bool toRequest);
  void Commit(Queue& q, uint16_t tag, int32_t result);
  void Reap(Queue& q);
  void ApplySubmit(Queue& q, const double* r, size_t n);
  void ApplyComplete(Queue& q, const int32_t* pairs, size_t n);
  void OnRequest(Queue& q, uint16_t tag);
  bool ServeFast(Queue& q, uint16_t tag);
  bool CommitHere(Queue& q, uint16_t tag);
  bool StartCommit(Queue& q, uint16_t tag);
  bool CommitAfterWrite(Queue& q, uint16_t tag);
  void ToEngine(Queue& q, uint16_t tag, bool fua, double length);
  void TakeRedirectsSoon();
  void OnCommandCompletion(Queue& q, uint16_t tag, int res);
  void OnBackingCompletion(Queue& q, uint16_t tag, uint16_t index, int res);
  void OnExtentCompletion(Queue& q, uint16_t tag, uint16_t index, int res);
  void ExtentsFinished(Queue& q, uint16_t tag);
  void SetLastError(const std::string& message);
  void StopThreads();
  void Shutdown();

  uint32_t devId_ = 0;
  uint32_t depth_ = 0;
  uint32_t bufferBytes_ = 0;
  // Each tag's buffer: bufferBytes_ (the largest request) unless segmented_.
  uint32_t tagBufferBytes_ = 0;
  int backingFd_ = -1;
  bool encode_ = false;
  // Requests' pages are registered in each ring's buffer table (UBLK_F_AUTO_BUF_REG) and this
  // side copies small requests itself (UBLK_F_USER_COPY); see QueueExtent.
  bool zeroCopy_ = false;
  // The device has UBLK_F_USER_COPY: the kernel copies nothing, this side moves every request's
  // data with pread/pwrite on /dev/ublkcN (always true with zero copy).
  bool userCopy_ = false;
  // User copy without zero copy: each tag's buffer is one segment (kSegmentBytes), for reads that
  // wait for the file, which move through it a segment at a time; see QueueExtent.
  bool segmented_ = false;
  // How long a queue thread polls its ring before it sleeps, ns; 0: never (see Poll).
  uint64_t pollNs_ = 0;
  // Cleared when the backing file refuses non-blocking reads; they all go to the ring then.
  std::atomic<bool> nowaitReads_{true};
  // The errno of the first fdatasync of the backing file that failed on a queue thread, or 0:
  // a fast flush's, a FUA write's, a commit step's, a flush's own (RunOwnSync). Linux reports
  // a writeback error once per open file, and that fdatasync took it: every later fdatasync of
  // this device fails with it instead, so no commit or flush succeeds over the lost pages
  // (SyncFailed).
  std::atomic<int> syncError_{0};
  Target target_ = Target::kMaster;
  // What the engine publishes; its arrays stay referenced (through the object) while the queues
  // serve.
  Published published_;
  Napi::ObjectReference publishedRef_;
  Fd charFd_;
  std::vector<std::unique_ptr<Queue>> queues_;
  bool started_ = false;
  Napi::FunctionReference onEvents_;
  // The one buffer every delivery to JS goes through (JS reads it inside onEvents, synchronously):
  // requests at [0, 5 x depth), ordered pairs at [5 x depth, 7 x depth), done pairs at
  // [7 x depth, 9 x depth), redirect records (tag, errno, offset, length) after that.
  Napi::Reference<Napi::Float64Array> eventsRef_;
  double* events_ = nullptr;
  // Where kMeta extents take their bytes: written by JS before it submits them, read by the
  // queue thread until the tag is done (JS runs one commit at a time).
  Napi::Reference<Napi::Uint8Array> metaRef_;
  const uint8_t* meta_ = nullptr;
  size_t metaBytes_ = 0;
  // Woken by the queue threads when their outbox gains something for JS.
  uv_async_t* async_ = nullptr;
  // A queue thread's map commit ended that the engine waits for: the next delivery calls JS even
  // with nothing else in it (Redirector::CommitDone).
  std::atomic<bool> wakeEngine_{false};
  std::unique_ptr<Napi::AsyncContext> context_;
  CleanupHook cleanup_;
  std::mutex errorMu_;
  std::string lastError_;
};

}  // namespace cldd
