#include "device.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <pthread.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "redirector.h"
#include "ublk.h"

namespace cldd {

namespace {
// First touches redirected on the queue threads (RedirectHere) past which the main thread is
// woken to take them: 24 KiB of journal records.
constexpr int32_t kTakeRedirectsAfter = 1024;
// user_data: ublk commands carry the tag; backing I/O sets the top bit and adds the extent index;
// the read of the wake eventfd is the one entry with the next bit; a chained read's steps
// (ChainRead) the next, with the chain's number, the tag and the step; its commit kChainCommit,
// the chain's number and the tag.
constexpr uint64_t kExtentBit = 1ULL << 63;
constexpr uint64_t kWakeData = 1ULL << 62;
constexpr uint64_t kChainBit = 1ULL << 61;
constexpr uint64_t kChainCommit = 1ULL << 60;
constexpr uint16_t kStepRead = 0, kStepCopy = 1;
constexpr uint8_t kChainRead = 1, kChainCopy = 2;
constexpr uint32_t kMaxExtents = 1u << 16;
// With zero copy, extents at least this long are read or written in place (see QueueExtent).
// Measured in the VM on Linux 7.3 against copying: reads of 64 KiB and more a draw or better
// (512 KiB: twice as fast); writes in place need a worker thread, which made 64 KiB writes
// slower, 256 KiB a draw and 512 KiB twice as fast.
constexpr uint32_t kInPlaceReadBytes = 16u << 10;
constexpr uint32_t kInPlaceWriteBytes = 256u << 10;
// Under user copy without zero copy a chained read (ChainRead) lands in its tag's own buffer,
// since the queue's scratch buffer is shared, so what each tag's chains touch stays resident:
// reads up to this long chain, at most depth x 16 KiB (2 MiB at depth 128). Chaining reads of up
// to the whole 64 KiB buffer, the daemon's anonymous memory after the full bench (6.12) grew
// from 32.4 to 37.2 MiB (RSS 78.9 MiB against the 80 MiB target). Longer reads gain least from
// the syscalls a chain saves.
constexpr uint32_t kChainCopyBytes = 16u << 10;
// Under user copy without zero copy, a read that must wait for the backing file moves through its
// tag's buffer this much at a time (see QueueExtent): the tags' buffers cost depth x this at most
// (8 MiB at depth 128). Measured in the VM (6.12, TCG, ext4 on brd, defaults, one run each) with
// an earlier version that moved every request through these buffers: larger segments made 1 MiB
// requests at QD8 no faster (32, 64, 128, 256 KiB: reads 905, 985, 886, 909 MiB/s; writes 644,
// 583, 565, 663; reads from a cold page cache 824, 729, 653, 394), while the daemon's peak RSS grew
// with them (67, 64, 73, 82 MiB, within a few MiB of noise; the target is 80).
constexpr uint32_t kSegmentBytes = 64u << 10;
// A poll that ran out doubles the waits slept through before the next one, up to 2^this - 1:
// with requests further apart than the poll, one wait in 64 polls in vain.
constexpr uint32_t kMaxPollBackoff = 6;

// Where a tag's request is, `within` bytes in, for pread/pwrite on /dev/ublkcN (user copy).
off_t UserCopyOffset(uint16_t queue, uint16_t tag, uint32_t within) {
  return off_t(kUserCopyBase + (uint64_t(queue) << kUserCopyQueueShift) + (uint64_t(tag) << kUserCopyTagShift) + within);
}

size_t RoundUp(size_t n, size_t to) { return (n + to - 1) / to * to; }

uint64_t NowNs() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return uint64_t(ts.tv_sec) * 1000000000ULL + uint64_t(ts.tv_nsec);
}
}  // namespace

Napi::Function Device::Define(Napi::Env env) {
  return DefineClass(env, "Device",
                     {
                         InstanceMethod<&Device::Start>("start"),
                         InstanceMethod<&Device::Submit>("submit"),
                         InstanceMethod<&Device::Complete>("complete"),
                         InstanceMethod<&Device::Close>("close"),
                         InstanceMethod<&Device::Inspect>("inspect"),
                         InstanceMethod<&Device::FastInFlight>("fastInFlight"),
                         InstanceMethod<&Device::Stats>("stats"),
                         InstanceAccessor<&Device::LastError>("lastError"),
                     });
}

Device::Device(const Napi::CallbackInfo& info) : Napi::ObjectWrap<Device>(info) {
  Napi::Env env = info.Env();
  Napi::Object options = info[0].As<Napi::Object>();
  devId_ = options.Get("devId").As<Napi::Number>().Uint32Value();
  uint32_t queues = options.Get("queues").As<Napi::Number>().Uint32Value();
  depth_ = options.Get("depth").As<Napi::Number>().Uint32Value();
  bufferBytes_ = options.Get("bufferBytes").As<Napi::Number>().Uint32Value();
  backingFd_ = options.Get("backingFd").As<Napi::Number>().Int32Value();
  encode_ = options.Get("ioctlEncode").ToBoolean();
  zeroCopy_ = options.Get("zeroCopy").ToBoolean();
  userCopy_ = zeroCopy_ || options.Get("userCopy").ToBoolean();
  segmented_ = userCopy_ && !zeroCopy_;
  target_ = options.Get("target").ToString().Utf8Value() == "slave" ? Target::kSlave : Target::kMaster;
  // Polling only helps where the submitter runs on another CPU: on one, it only takes that CPU
  // from the process whose next request it waits for.
  Napi::Value poll = options.Get("pollMicros");
  if (poll.IsNumber() && poll.As<Napi::Number>().DoubleValue() > 0) {
    cpu_set_t allowed;
    CPU_ZERO(&allowed);
    bool several = ::sched_getaffinity(0, sizeof allowed, &allowed) == 0 && CPU_COUNT(&allowed) > 1;
    if (several) pollNs_ = uint64_t(std::min(poll.As<Napi::Number>().DoubleValue(), kMaxPollMicros) * 1000.0);
  }
  onEvents_ = Napi::Persistent(options.Get("onEvents").As<Napi::Function>());
  std::string name = "ublk device " + std::to_string(devId_);
  if (queues == 0 || depth_ == 0 || depth_ > kMaxDepth || bufferBytes_ == 0 || bufferBytes_ % 512) {
    throw CodeError(env, "EINVAL", name + ": bad queue count, depth or buffer size");
  }
  tagBufferBytes_ = segmented_ ? std::min(bufferBytes_, kSegmentBytes) : bufferBytes_;
  Napi::Float64Array events = options.Get("events").As<Napi::Float64Array>();
  if (events.ElementLength() < kEventsPerTag * depth_) {
    throw CodeError(env, "EINVAL", name + ": the events buffer must hold " + std::to_string(kEventsPerTag * depth_) + " numbers");
  }
  eventsRef_ = Napi::Persistent(events);
  events_ = events.Data();
  Napi::Value meta = options.Get("meta");
  if (meta.IsTypedArray()) {
    Napi::Uint8Array bytes = meta.As<Napi::Uint8Array>();
    metaRef_ = Napi::Persistent(bytes);
    meta_ = bytes.Data();
    metaBytes_ = bytes.ByteLength();
  }
  Napi::Value cpus = options.Get("cpus");
  // The engine's publication; without one every request goes to the engine.
  Napi::Value pub = options.Get("published");
  if (pub.IsObject()) {
    Napi::Object p = pub.As<Napi::Object>();
    std::string error = ReadPublication(p, &published_);
    if (!error.empty()) throw CodeError(env, "EINVAL", name + ": " + error);
    // The arrays stay alive, and in place, while this device holds them.
    publishedRef_ = Napi::Persistent(p);
  }
  std::string path = "/dev/ublkc" + std::to_string(devId_);
  charFd_.Reset(::open(path.c_str(), O_RDWR | O_CLOEXEC));
  if (!charFd_.valid()) throw ErrnoError(env, errno, "open " + path);
  if (segmented_) {
    // A chained read copies into the request with a write to this file through the ring
    // (ChainRead). io_uring issues a write inline only to a file that says it can be asked not
    // to block (FMODE_NOWAIT or O_NONBLOCK: io_file_get_flags), else it hands it to a worker
    // thread; ublk's char device does not say so, though its copy waits for nothing but the
    // request's pages. Nothing else done with this file looks at O_NONBLOCK.
    int fl = ::fcntl(charFd_.get(), F_GETFL);
    if (fl < 0 || ::fcntl(charFd_.get(), F_SETFL, fl | O_NONBLOCK) < 0) throw ErrnoError(env, errno, "fcntl " + path);
  }

  size_t page = size_t(::sysconf(_SC_PAGESIZE));
  size_t stride = RoundUp(kMaxDepth * sizeof(IoDesc), page);
  context_ = std::make_unique<Napi::AsyncContext>(env, "cldd:ublk-queue");
  for (uint32_t id = 0; id < queues; id++) {
    auto q = std::make_unique<Queue>();
    if (cpus.IsArray() && id < cpus.As<Napi::Array>().Length()) q->cpu = cpus.As<Napi::Array>().Get(id).ToNumber().Int32Value();
    q->id = uint16_t(id);
    q->tags.reset(new Tag[depth_]);
    q->outRequests.reserve(kRequestFields * depth_);
    q->outOrdered.reserve(2 * depth_);
    q->outDone.reserve(2 * depth_);
    q->outRedirects.reserve(kRedirectFields * depth_);
    int err = q->descriptors.Map(RoundUp(depth_ * sizeof(IoDesc), page), PROT_READ, MAP_SHARED | MAP_POPULATE,
                                 charFd_.get(), off_t(id * stride));
    if (err) throw ErrnoError(env, err, name + ": map the descriptors of queue " + std::to_string(id));
    // Untouched tag buffers cost address space only, and a touched one only the pages its
    // requests used: without huge pages. With transparent huge pages each 4 KiB request faulted
    // in 2 MiB, two tags' whole buffers: measured in the VM with the defaults (depth 128 x 1 MiB),
    // the daemon's RSS grew by 73 MiB during 4 KiB reads and reached 168-201 MiB, most of it this
    // mapping. Best effort: a kernel without THP has nothing to turn off.
    // Segmented, the queue's scratch buffer follows the tags' (see Scratch).
    err = q->buffers.Map(size_t(depth_) * tagBufferBytes_ + (segmented_ ? bufferBytes_ : 0), PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (err) throw ErrnoError(env, err, name + ": allocate the buffers of queue " + std::to_string(id));
    ::madvise(q->buffers.data(), q->buffers.size(), MADV_NOHUGEPAGE);
    q->wake.Reset(::eventfd(0, EFD_CLOEXEC));
    if (!q->wake.valid()) throw ErrnoError(env, errno, name + ": eventfd for queue " + std::to_string(id));
    // Three entries per tag at most (a chained read: the read, the copy, the commit; otherwise a
    // command and a backing I/O), the wake read and a flush's fdatasync.
    unsigned entries = 64;
    while (entries < 3 * depth_ + 2) entries *= 2;
    // Cooperative task work: the kernel's completions for this ring (ublk handing a request over,
    // a backing read finishing) wait for the queue thread's next io_uring_enter instead of
    // interrupting it with an IPI, as the reference server does. Measured in the VM (6.12,
    // TCG), two pairs side by side: 4 KiB random reads at QD32 59.9-62.8k IOPS against 38.9-42.2k
    // without it (the reference server 48.4-51.7k), random writes at QD32 39.5-43.1k against
    // 26.5-31.4k; QD1 a draw. Every 5.19+ kernel has it, and ublk needs 6.0.
    // Deferred task work (6.1+; a 6.0 kernel refuses the flags and gets cooperative task work
    // alone) goes further: the kernel queues the ring's task work on the ring itself and runs it
    // inside the queue thread's io_uring_enter, batched, rather than adding it to the thread as
    // task work of its own (run once per item: `perf stat -e io_uring:*` on the thread counted
    // 2.8 task work runs per chained read, the reference server one local run). A chained read's
    // linked steps each go through task work, so this mattered once reads were chained: two
    // pairs side by side in one VM, 4 rounds each, with and without it: 6.12 random writes at
    // QD32 39.4-53.2k against 33.4-43.7k IOPS, reads at QD32 54.1-70.7k against 53.9-68.7k;
    // 7.3 (zero copy) writes at QD32 23.0-34.9k against 14.5-26.9k, reads at QD32 55.4-70.9k
    // against 57.9-65.7k; QD1 a draw on both. (Without chains, in the eleventh session, it was
    // a draw: docs/benchmarks.md.) It needs a single issuer, the thread that enables the ring
    // (Run), so the ring starts disabled; a disabled ring takes the buffer table below from
    // this thread.
    q->ring.Init(env, entries,
                 IORING_SETUP_COOP_TASKRUN | IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_R_DISABLED |
                     IORING_SETUP_TASKRUN_FLAG,
                 name + " queue " + std::to_string(id), IORING_SETUP_COOP_TASKRUN);
    if (zeroCopy_) {
      // One empty slot per tag: the kernel installs each request's pages at index = tag.
      int rc = io_uring_register_buffers_sparse(q->ring.get(), depth_);
      if (rc < 0) throw ErrnoError(env, -rc, name + ": register the buffer table of queue " + std::to_string(id));
    }
    queues_.push_back(std::move(q));
  }
  uv_loop_t* loop = nullptr;
  napi_get_uv_event_loop(env, &loop);
  async_ = new uv_async_t;
  uv_async_init(loop, async_, &Device::OnAsync);
  async_->data = this;
  uv_unref(reinterpret_cast<uv_handle_t*>(async_));
  cleanup_.Add(env, [](void* self) { static_cast<Device*>(self)->Shutdown(); }, this);
}

Device::Queue& Device::QueueArg(Napi::Env env, const Napi::Value& value) {
  uint32_t id = value.As<Napi::Number>().Uint32Value();
  if (id >= queues_.size() || !queues_[id]->ring.open()) {
    throw CodeError(env, "EINVAL", "ublk device " + std::to_string(devId_) + ": no open queue " + std::to_string(id));
  }
  return *queues_[id];
}

void Device::SetLastError(const std::string& message) {
  std::lock_guard<std::mutex> lock(errorMu_);
  lastError_ = message;
}

// ---------------------------------------------------------------- the Node main thread

Napi::Value Device::Start(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (started_) return env.Undefined();
  started_ = true;
  for (auto& q : queues_) {
    Queue* raw = q.get();
    try {
      q->thread = std::thread([this, raw] { Run(*raw); });
    } catch (const std::system_error& e) {
      throw CodeError(env, "EAGAIN", "ublk device " + std::to_string(devId_) + ": start the thread of queue " +
                                         std::to_string(q->id) + ": " + e.what());
    }
  }
  // Serving queues keep the process alive until the kernel aborts their tags.
  uv_ref(reinterpret_cast<uv_handle_t*>(async_));
  return env.Undefined();
}

// submit(queue, records, n): the first n numbers of records are plans, each
// (tag, needsEngine, count, count x (kind, offset, length, bufferOffset)).
Napi::Value Device::Submit(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Queue& q = QueueArg(env, info[0]);
  Napi::Float64Array records = info[1].As<Napi::Float64Array>();
  const double* r = records.Data();
  size_t n = std::min<size_t>(records.ElementLength(), info[2].As<Napi::Number>().Uint32Value());
  std::string error = ValidateSubmit(q, r, n);
  if (!error.empty()) throw CodeError(env, "EINVAL", error);
  {
    std::lock_guard<std::mutex> lock(q.mu);
    q.submits.insert(q.submits.end(), r, r + n);
  }
  Wake(q);
  return env.Undefined();
}

// Validates every record before anything is queued, so a bad record leaves no tag half-started;
// returns what was wrong, or nothing. A tag's bytes were written by its queue thread before the
// request was delivered (under the queue's mutex), so they are safe to read here.
std::string Device::ValidateSubmit(Queue& q, const double* r, size_t n) {
  for (size_t i = 0; i < n;) {
    if (i + 3 > n) return "submit: truncated plan record";
    double tag = r[i], count = r[i + 2];
    if (tag < 0 || tag >= depth_ || q.tags[size_t(tag)].state.load() != uint8_t(TagState::kEngine)) {
      return "submit: tag " + std::to_string(tag) + " of queue " + std::to_string(q.id) + " is not being planned";
    }
    if (count < 1 || count > kMaxExtents || i + 3 + 4 * size_t(count) > n) {
      return "submit: bad extent count for tag " + std::to_string(tag);
    }
    const Tag& t = q.tags[size_t(tag)];
    double flags = r[i + 1];
    if (flags != 0 && flags != kSubmitNeedsEngine && flags != kSubmitInOrder) {
      return "submit: bad flags for tag " + std::to_string(tag);
    }
    // A commit's steps (in order) run only for a flush, which has no data of its own.
    if (flags == kSubmitInOrder && t.op != UBLK_IO_OP_FLUSH) {
      return "submit: tag " + std::to_string(tag) + " is not a flush, so it cannot run a commit";
    }
    for (size_t k = 0; k < size_t(count); k++) {
      const double* e = r + i + 3 + 4 * k;
      double kind = e[0];
      bool fits;
      if (flags == kSubmitInOrder) {
        // fdatasync, or metadata from the metadata buffer.
        fits = (kind == double(kSync) && e[2] == 0 &&
                (e[3] == 0 ? e[1] == 0 : e[3] == kCommitSyncSkippable && e[1] >= 0 && e[1] <= double(UINT32_MAX))) ||
               (kind == double(kMeta) && e[1] >= 0 && e[2] > 0 && e[2] <= double(UINT32_MAX) && e[3] >= 0 &&
                e[3] + e[2] <= double(metaBytes_));
      } else {
        // Data extents stay inside the request's buffer; zero extents only need to fit 32 bits.
        fits = kind >= 0 && kind <= double(kZero) && e[1] >= 0 && e[2] > 0 && e[2] <= double(UINT32_MAX) &&
               (kind == double(kZero) || e[3] + e[2] <= double(t.bytes));
      }
      if (!fits) {
        return "submit: extent " + std::to_string(k) + " of tag " + std::to_string(tag) + " does not fit its request";
      }
    }
    i += 3 + 4 * size_t(count);
  }
  return {};
}

// complete(queue, pairs, n): the first n numbers of pairs are (tag, result) with result 0 for
// success or -errno.
Napi::Value Device::Complete(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Queue& q = QueueArg(env, info[0]);
  Napi::Int32Array pairs = info[1].As<Napi::Int32Array>();
  size_t n = std::min<size_t>(pairs.ElementLength(), info[2].As<Napi::Number>().Uint32Value()) & ~size_t(1);
  std::string error = ValidateComplete(q, pairs.Data(), n);
  if (!error.empty()) throw CodeError(env, "EINVAL", error);
  {
    std::lock_guard<std::mutex> lock(q.mu);
    q.completes.insert(q.completes.end(), pairs.Data(), pairs.Data() + n);
  }
  Wake(q);
  return env.Undefined();
}

std::string Device::ValidateComplete(Queue& q, const int32_t* pairs, size_t n) {
  for (size_t i = 0; i + 1 < n; i += 2) {
    int32_t tag = pairs[i];
    uint8_t state = tag >= 0 && uint32_t(tag) < depth_ ? q.tags[tag].state.load() : uint8_t(TagState::kDead);
    if (state != uint8_t(TagState::kEngine) && state != uint8_t(TagState::kWaiting)) {
      return "complete: tag " + std::to_string(tag) + " of queue " + std::to_string(q.id) + " is not waiting for the engine";
    }
  }
  return {};
}

// Wakes the queue thread for its inbox: once per batch, however many submits and completes.
void Device::Wake(Queue& q) {
  {
    std::lock_guard<std::mutex> lock(q.mu);
    if (q.wakePending) return;
    q.wakePending = true;
  }
  uint64_t one = 1;
  ssize_t n;
  do n = ::write(q.wake.get(), &one, sizeof one);
  while (n < 0 && errno == EINTR);
}

void Device::OnAsync(uv_async_t* handle) {
  auto* self = static_cast<Device*>(handle->data);
  if (!self) return;
  RunFromLoop(self->Env(), *self->context_, [self] { self->Deliver(); });
}

// Hands JS what the queue threads gathered, a queue at a time, in slices the events buffer holds.
void Device::Deliver() {
  Napi::Env env = Env();
  std::vector<double> requests, redirects;
  std::vector<int32_t> ordered, done;
  bool called = false;
  // Taken before any call into JS, not after. A queue thread that ends a map commit the engine
  // waits for sets this and then sends the async, which brings another Deliver. Set while a call
  // below runs, after that call checked the commit, it stays set for that next Deliver. Taken
  // after the calls, it would be lost: this Deliver makes no extra call once it has called, and
  // the next one would find it clear. The engine's wait would then run out (10 s) and fail the
  // volume.
  bool wake = wakeEngine_.exchange(false);
  // Delivering runs JS that may close the device: index, do not iterate the vector.
  for (size_t i = 0; i < queues_.size(); i++) {
    Queue* q = queues_[i].get();
    bool stopped = false;
    {
      std::lock_guard<std::mutex> lock(q->mu);
      requests.swap(q->requests);
      ordered.swap(q->ordered);
      done.swap(q->done);
      redirects.swap(q->redirects);
      if (q->stopped && !q->stoppedDelivered) stopped = q->stoppedDelivered = true;
    }
    size_t r = 0, o = 0, d = 0, x = 0;
    do {
      size_t nr = std::min(requests.size() - r, kRequestFields * depth_);
      size_t no = std::min(ordered.size() - o, size_t(2) * depth_);
      size_t nd = std::min(done.size() - d, size_t(2) * depth_);
      size_t nx = std::min(redirects.size() - x, kRedirectFields * depth_);
      bool last = r + nr == requests.size() && o + no == ordered.size() && d + nd == done.size() && x + nx == redirects.size();
      if (nr + no + nd + nx == 0 && !(last && stopped)) break;
      std::memcpy(events_, requests.data() + r, nr * sizeof(double));
      double* out = events_ + kRequestFields * depth_;
      for (size_t k = 0; k < no; k++) out[k] = ordered[o + k];
      out += 2 * depth_;
      for (size_t k = 0; k < nd; k++) out[k] = done[d + k];
      out += 2 * depth_;
      std::memcpy(out, redirects.data() + x, nx * sizeof(double));
      r += nr, o += no, d += nd, x += nx;
      called = true;
      onEvents_.Call(Value(), {Napi::Number::New(env, q->id), Napi::Number::New(env, double(nr / kRequestFields)),
                               Napi::Number::New(env, double(no / 2)), Napi::Number::New(env, double(nd / 2)),
                               Napi::Number::New(env, double(nx / kRedirectFields)), Napi::Boolean::New(env, last && stopped)});
      if (last) break;
    } while (events_ != nullptr && i < queues_.size() && queues_[i].get() == q);
    requests.clear();
    ordered.clear();
    done.clear();
    redirects.clear();
  }
  // A wake-up with nothing else for JS: first touches redirected here, for the engine to take
  // (onEvents takes them whatever it carries), or a queue thread's map commit the engine waits
  // for ended (takeRedirects ends that wait). A call above took them already: it came after the
  // wake was set.
  if (!called && published_.redirector && (wake || published_.Word(published::kRedirected) != 0) && !queues_.empty() && events_) {
    onEvents_.Call(Value(), {Napi::Number::New(env, queues_[0]->id), Napi::Number::New(env, 0), Napi::Number::New(env, 0),
                             Napi::Number::New(env, 0), Napi::Number::New(env, 0), Napi::Boolean::New(env, false)});
  }
  // Once every queue has stopped, nothing keeps the process alive for this device.
  bool all = !queues_.empty();
  for (auto& q : queues_) {
    std::lock_guard<std::mutex> lock(q->mu);
    all = all && q->stoppedDelivered;
  }
  if (all && async_) uv_unref(reinterpret_cast<uv_handle_t*>(async_));
}

// ---------------------------------------------------------------- the queue threads

// One queue's thread: issues the fetches (which makes it the queue's daemon task), then submits
// and waits in one io_uring_enter per round, until the kernel has aborted every tag (the device
// stopped) or close() asks, and its backing I/O has finished.
void Device::Run(Queue& q) {
  std::string name = "cldd-" + std::to_string(devId_) + "q" + std::to_string(q.id);
  pthread_setname_np(pthread_self(), name.substr(0, 15).c_str());
  // On one CPU, chosen by src/ublk/affinity.ts (which one, and why). Best effort: a CPU gone
  // offline or taken out of the cpuset since leaves the thread unpinned.
  if (q.cpu >= 0 && q.cpu < CPU_SETSIZE) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(q.cpu, &set);
    ::sched_setaffinity(0, sizeof(set), &set);
  }
  // This thread writes to the backing file on behalf of the block layer: under memory pressure it
  // must not be throttled like an ordinary writer. Best effort: it needs CAP_SYS_RESOURCE and
  // only changes reclaim behaviour, not correctness.
  ::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0);
  // The ring's single issuer is the thread that enables it.
  if (q.ring.get()->flags & IORING_SETUP_R_DISABLED) {
    int rc = io_uring_enable_rings(q.ring.get());
    if (rc < 0) {
      RingFailed(q, ErrnoMessage(-rc, "ublk device " + std::to_string(devId_) + " queue " + std::to_string(q.id) + ": enable its io_uring"));
      if (async_) uv_async_send(async_);
      return;
    }
  }
  q.live = depth_;
  for (uint32_t tag = 0; tag < depth_; tag++) {
    q.tags[tag].state.store(uint8_t(TagState::kFetching));
    QueueCommand(q, uint16_t(tag), kIoFetch, 0);
  }
  ArmWake(q);
  // Only a ring whose deferred task work raises IORING_SQ_TASKRUN can be polled (Poll).
  const unsigned pollable = IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_TASKRUN_FLAG;
  const uint64_t pollNs = (q.ring.get()->flags & pollable) == pollable ? pollNs_ : 0;
  for (;;) {
    uint64_t arrivals = q.arrivals;
    PollRound round;
    int rc = pollNs ? Wait(q, pollNs, &round) : io_uring_submit_and_wait(q.ring.get(), 1);
    if (rc < 0 && rc != -EINTR && rc != -EAGAIN && rc != -EBUSY && rc != -ETIME) {
      // The ring itself failed: nothing this queue holds can complete any more.
      RingFailed(q, ErrnoMessage(-rc, "ublk device " + std::to_string(devId_) + " queue " + std::to_string(q.id) + ": io_uring_enter"));
      break;
    }
    Reap(q);
    if (pollNs) AdaptPoll(q, round, q.arrivals != arrivals);
    RedirectHere(q);
    PublishOutbox(q);
    RunOwnSync(q);
    if ((q.exiting || q.live == 0) && q.backingInFlight.load() == 0) break;
  }
  PublishOutbox(q);
  if (async_) uv_async_send(async_);
}

namespace {
bool TaskWorkPending(io_uring* ring) { return (__atomic_load_n(ring->sq.kflags, __ATOMIC_ACQUIRE) & IORING_SQ_TASKRUN) != 0; }
}  // namespace

// The queue thread's wait, polling first (docs/serving.md, "The queue thread's wait"): before it
// sleeps, the thread watches its ring for up to pollNs for work, a completion or deferred task
// work (IORING_SQ_TASKRUN: ublk handing it a request, a backing I/O done, the wake eventfd),
// which the io_uring_enter after it runs at once. A request that comes within the poll reaches
// the thread without the wake-up of a sleeping thread, which a sync reader or writer pays on
// every request. What this round queued goes first, with the task work it starts: work found
// then is this round's own, and the thread goes on without a wait of its own (round->waited
// false). Returns what the io_uring_enter returned.
int Device::Wait(Queue& q, uint64_t pollNs, PollRound* round) {
  io_uring* ring = q.ring.get();
  *round = PollRound{};
  if (io_uring_sq_ready(ring) > 0 || TaskWorkPending(ring)) {
    int rc = io_uring_submit_and_get_events(ring);
    if (rc < 0 || io_uring_cq_ready(ring) > 0) return rc;
  } else if (io_uring_cq_ready(ring) > 0) {
    return 0;
  }
  uint64_t idle = NowNs();
  round->waited = true;
  round->polled = q.pollSkip == 0;
  if (round->polled) round->caught = Poll(q, idle + pollNs);
  else q.pollSkip--;
  int rc = io_uring_submit_and_wait(ring, 1);
  round->soon = round->caught || NowNs() - idle <= pollNs;
  return rc;
}

// After a wait and its completions: how often the thread polls. Only work from outside counts as
// having come (a request from ublk, the engine's answers): not the completion of I/O the thread
// submitted itself (a backing read from the ring, a chained read's steps, whose task work can
// come after the submit that started them returned), which a poll may catch as well but which
// says nothing of when the next request comes. Work that came within the poll's time, polled
// for or slept through, brings polling back at once; a poll that ran out doubles the waits slept
// through without polling before the next one (kMaxPollBackoff), so requests further apart than
// the poll cost one poll in 64 of them.
void Device::AdaptPoll(Queue& q, const PollRound& round, bool came) {
  if (!round.waited) return;
  if (came && round.soon) {
    q.pollMisses = 0;
    q.pollSkip = 0;
    if (round.polled) q.counters.pollsCaught.fetch_add(1, std::memory_order_relaxed);
  } else if (round.polled && !round.caught) {
    q.pollMisses = std::min(q.pollMisses + 1, kMaxPollBackoff);
    q.pollSkip = (1u << q.pollMisses) - 1;
    q.counters.pollsRanOut.fetch_add(1, std::memory_order_relaxed);
  }
}

// Watches the ring until `deadline`; true when work came. Measured in the VM (6.12, TCG, ext4
// on brd, 256 MiB pairs of one build, --poll-us 100 and 0, one VM, 3 rounds of 4 s), 4 KiB
// random reads at QD1: 6401/9735/7522 IOPS polling against 3116/5097/4308 without (loop
// 4737/9470/7140); random writes at QD1 9937/8293/4687 against 4037/2878/2943 (loop
// 7021/5155/5173). Never skipping a poll after one ran out (no backoff) measured the same
// (reads 7562/9608/7884). An earlier build that polled 30 us caught too few: 4773-5426 reads
// against 8624-8753 polling 100 us.
bool Device::Poll(Queue& q, uint64_t deadline) {
  io_uring* ring = q.ring.get();
  for (uint32_t k = 1;; k++) {
    if (io_uring_cq_ready(ring) > 0 || TaskWorkPending(ring)) return true;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield" ::: "memory");
#endif
    if ((k & 31) == 0 && NowNs() >= deadline) return false;
  }
}

// A flush that went to the engine for a commit, alone on its queue: its thread runs the commit's
// first fdatasync now, while the engine builds the commit on the main thread, rather than after
// (docs/serving.md, "A flush's own sync"). It reads the map-change count first; the engine marks
// that step skippable at the count its capture saw when this flush alone asked for the commit,
// and the step is left out when both agree (OwnSyncCovers). Only for a flush alone on the queue:
// the fdatasync holds the thread, as a fast flush's does. In the never-written first-touch job
// at QD1 with fsync (6.12 VM, TCG, ext4 on brd, one VM, the build before and this one
// alternating, 4 rounds), 147-186 IOPS before and 198-340 after (medians 167 and 285): there the
// first fdatasync commits the file system's allocation of the block the write landed on, the
// longest of the three, and the engine's build of the commit under TCG is as long. Into a
// written change area, where that fdatasync is short, no change (269-301 against 247-292).
void Device::RunOwnSync(Queue& q) {
  int tag = q.ownSyncTag;
  q.ownSyncTag = -1;
  if (tag < 0 || q.busy != 1 || !published_.words || syncError_.load(std::memory_order_relaxed)) return;
  Tag& t = q.tags[tag];
  if (t.state.load() != uint8_t(TagState::kEngine) || published_.Word(published::kCommitPending) == 0) return;
  // Every change counted up to here had its data complete first (Volume.changeMaps, Redirect).
  uint32_t count = uint32_t(published_.Word(published::kMapChanges));
  int res;
  do res = ::fdatasync(backingFd_);
  while (res < 0 && errno == EINTR);
  if (res < 0) {
    int err = errno;
    t.ownSyncError = err;
    SyncFailed(q, uint16_t(tag), err);
    return;
  }
  t.ownSync = OwnSync{true, count};
}

// An fdatasync of the backing file failed for `tag`: the first such error is kept, and every
// later fdatasync on the queue threads fails with it (QueueExtent). The failed one took the
// file's writeback error, so the next would succeed over pages that never reached the disk:
// writes completed before it, and acknowledged by no flush yet, that a later flush would then
// acknowledge.
void Device::SyncFailed(Queue& q, uint16_t tag, int err) {
  int none = 0;
  if (!syncError_.compare_exchange_strong(none, err)) return;
  SetLastError(ErrnoMessage(err, "ublk device " + std::to_string(devId_) + " queue " + std::to_string(q.id) + ": fdatasync of the backing file for tag " + std::to_string(tag) + " failed; every later flush fails"));
}

// The queue's ring cannot be used: its thread stops serving, and says why (inspect, start).
void Device::RingFailed(Queue& q, const std::string& why) {
  SetLastError(why);
  std::lock_guard<std::mutex> lock(q.mu);
  q.failure = why;
  q.stopped = true;
}

void Device::ArmWake(Queue& q) {
  io_uring_sqe* sqe = q.ring.Sqe();
  if (!sqe) return;
  io_uring_prep_read(sqe, q.wake.get(), &q.wakeValue, sizeof q.wakeValue, 0);
  sqe->user_data = kWakeData;
}

// JS's plans and results, and close's request, taken in one go.
void Device::TakeInbox(Queue& q) {
  {
    std::lock_guard<std::mutex> lock(q.mu);
    q.takenSubmits.swap(q.submits);
    q.takenCompletes.swap(q.completes);
    q.wakePending = false;
    if (q.closeRequested) q.exiting = true;
  }
  ApplySubmit(q, q.takenSubmits.data(), q.takenSubmits.size());
  ApplyComplete(q, q.takenCompletes.data(), q.takenCompletes.size());
  q.takenSubmits.clear();
  q.takenCompletes.clear();
}

// The first touches this round wrote (their records wait in outRedirects): redirected here, all
// at once, when the engine's map lock is free (native/redirector.h, docs/serving.md), and
// completed; otherwise, and for a write that failed, the engine redirects or fails them as
// before. Either way the request leaves fastInFlight only once its blocks are redirected.
void Device::RedirectHere(Queue& q) {
  Redirector* r = published_.redirector;
  if (!r || q.outRedirects.empty()) return;
  const uint32_t shift = published_.geometry.blockShift;
  q.ranges.clear();
  for (size_t i = 0; i < q.outRedirects.size(); i += kRedirectFields) {
    if (q.outRedirects[i + 1] != 0) continue;
    uint64_t offset = uint64_t(q.outRedirects[i + 2]), bytes = uint64_t(q.outRedirects[i + 3]);
    q.ranges.push_back(offset >> shift);
    q.ranges.push_back((offset + bytes) >> shift);
  }
  if (q.ranges.empty() || !r->Redirect(published_, q.ranges.data(), q.ranges.size() / 2)) return;
  size_t kept = 0;
  for (size_t i = 0; i < q.outRedirects.size(); i += kRedirectFields) {
    if (q.outRedirects[i + 1] != 0) {
      std::copy_n(q.outRedirects.begin() + ptrdiff_t(i), kRedirectFields, q.outRedirects.begin() + ptrdiff_t(kept));
      kept += kRedirectFields;
      continue;
    }
    auto tag = uint16_t(q.outRedirects[i]);
    Tag& t = q.tags[tag];
    t.redirect = false;
    q.counters.writes.fetch_add(1, std::memory_order_relaxed);
    q.counters.bytesWritten.fetch_add(t.bytes, std::memory_order_relaxed);
    Commit(q, tag, int32_t(t.bytes));
    q.fastInFlight.fetch_sub(1, std::memory_order_seq_cst);
  }
  q.outRedirects.resize(kept);
  TakeRedirectsSoon();
}

// Moves what this round gathered for JS into the outbox, and wakes the main thread for it.
void Device::PublishOutbox(Queue& q) {
  bool stopping = q.live == 0 && q.backingInFlight.load() == 0;
  if (q.outRequests.empty() && q.outOrdered.empty() && q.outDone.empty() && q.outRedirects.empty() && !stopping) return;
  {
    std::lock_guard<std::mutex> lock(q.mu);
    q.requests.insert(q.requests.end(), q.outRequests.begin(), q.outRequests.end());
    q.ordered.insert(q.ordered.end(), q.outOrdered.begin(), q.outOrdered.end());
    q.done.insert(q.done.end(), q.outDone.begin(), q.outDone.end());
    q.redirects.insert(q.redirects.end(), q.outRedirects.begin(), q.outRedirects.end());
    if (stopping) q.stopped = true;
  }
  q.outRequests.clear();
  q.outOrdered.clear();
  q.outDone.clear();
  q.outRedirects.clear();
  if (async_) uv_async_send(async_);
}

void Device::QueueCommand(Queue& q, uint16_t tag, uint32_t op, int32_t result, uint64_t userData) {
  io_uring_sqe* sqe = q.ring.Sqe();
  if (!sqe) {
    // The ring refused its queued entries: the tag cannot go on.
    SetLastError("ublk device " + std::to_string(devId_) + " queue " + std::to_string(q.id) + ": the ring refused submissions");
    q.tags[tag].state.store(uint8_t(TagState::kDead));
    if (q.live > 0) q.live--;
    return;
  }
  // liburing 2.3 has no URING_CMD helper: a zeroed SQE with the opcode and command filled in.
  std::memset(sqe, 0, sizeof *sqe);
  sqe->opcode = IORING_OP_URING_CMD;
  sqe->fd = charFd_.get();
  sqe->cmd_op = encode_ ? EncodeIo(op) : op;
  // Under user copy the kernel copies nothing and refuses a buffer address (EINVAL).
  uint64_t buffer = userCopy_ ? 0 : reinterpret_cast<uintptr_t>(TagBuffer(q, tag));
  IoCmd cmd{q.id, tag, result, buffer};
  std::memcpy(sqe->cmd, &cmd, sizeof cmd);
  // Automatic registration reads its buffer index from the SQE's addr (index in bits 0-15, no
  // flags): the tag's request is registered there when it arrives, unregistered at its commit.
  if (zeroCopy_) sqe->addr = tag;
  sqe->user_data = userData | tag;
}

// How an extent's data moves. Without user copy (before 6.5) the kernel copies each request
// between its pages and the tag buffer (at FETCH for writes, at COMMIT for reads), so each tag
// needs a buffer as large as the largest request. With user copy but not zero copy (6.5-6.15, or
// zero copy turned off) the kernel copies nothing and this thread moves the data between the
// request and a buffer itself (pread/pwrite on /dev/ublkcN). What it does from start to end
// without waiting, a write (copied from the request, written to the file) or a read the page
// cache holds (read, copied into the request), goes through the queue's one scratch buffer. A
// read that must wait for the file goes to the ring a segment at a time (kSegmentBytes) into the
// tag's own buffer, is copied into the request when it completes, and the extent goes on from
// `done`; while one is in flight, the tag's other extents that need the ring wait
// (Tag::waiting). With zero copy the request's pages are registered in the queue's ring at
// index = tag (UBLK_F_AUTO_BUF_REG) and the kernel copies nothing:
// - a large extent is read or written in place by io_uring (READ_FIXED/WRITE_FIXED): one copy,
//   between the page cache and the request. A cached read is done inside the submit; a write
//   goes to an io_uring worker at once (ext4 cannot write buffered without blocking), on
//   another CPU where there is one, while this thread goes on with other requests;
// - a small one goes through the tag buffer, this thread copying it from or to the request
//   itself (UBLK_F_USER_COPY: pread/pwrite on /dev/ublkcN), because a trip through a worker
//   costs more than copying a few KiB twice.
// Writes reach the page cache from this thread. Through io_uring, ext4 (no non-blocking
// buffered writes on 6.12) and tmpfs hand every buffered write to a worker thread, which
// serialises one file's writes anyway and costs two thread hops per request: measured in the
// VM on ext4, 4 KiB random writes went from 286-340 to 458-565 IOPS at QD1 and from 4368-4856
// to 7154-7569 at QD32. The loop driver writes synchronously from its worker too.
// Reads try the page cache first, without blocking (RWF_NOWAIT): a fast read of one extent as a
// chain of ring entries with its commit (ChainRead); any other from this thread, where a hit
// lets the commit leave in the same io_uring_enter as the next submissions instead of a round
// trip of its own through the ring. A miss, or a part of one, goes to the ring, so that one
// request's miss does not hold up the queue's others. A flush's fdatasync goes to the ring too,
// unless nothing else is on the queue (below).
void Device::QueueExtent(Queue& q, uint16_t tag, uint16_t index) {
  Tag& t = q.tags[tag];
  Extent& e = t.extents[index];
  uint32_t left = e.length - e.done;
  uint64_t at = e.offset + e.done;            // in the backing file
  if (e.kind == kMeta) {
    // A commit's page or superblock: to the page cache from this thread, as data writes go.
    ssize_t n;
    do n = ::pwrite(backingFd_, meta_ + e.bufferOffset + e.done, left, off_t(at));
    while (n < 0 && errno == EINTR);
    OnExtentCompletion(q, tag, index, n < 0 ? -errno : int(n));
    return;
  }
  uint32_t within = e.bufferOffset + e.done;  // in the request
  // The tag's buffer mirrors the whole request; segmented, what is copied at once goes through
  // the queue's scratch buffer (as large as the largest request: the clamp only guards it).
  uint8_t* mem = segmented_ ? Scratch(q) : TagBuffer(q, tag) + within;
  if (segmented_) left = std::min(left, bufferBytes_);
  bool inPlace = zeroCopy_ && ((e.kind == kRead && left >= kInPlaceReadBytes) || (e.kind == kWrite && left >= kInPlaceWriteBytes));
  if (e.kind == kRead && nowaitReads_.load(std::memory_order_relaxed) && !inPlace) {
    iovec iov{mem, left};
    ssize_t n;
    do n = ::preadv2(backingFd_, &iov, 1, off_t(at), RWF_NOWAIT);
    while (n < 0 && errno == EINTR);
    if (n >= 0 || (errno != EAGAIN && errno != EOPNOTSUPP)) {
      int res = n < 0 ? -errno : int(n);
      if (n > 0 && userCopy_) res = CopyRequest(q, tag, within, mem, uint32_t(n), true);
      OnExtentCompletion(q, tag, index, res);
      return;
    }
    if (errno == EOPNOTSUPP) nowaitReads_.store(false, std::memory_order_relaxed);  // this file system never can
  }
  if (e.kind == kWrite && !inPlace) {
    int res = userCopy_ ? CopyRequest(q, tag, within, mem, left, false) : int(left);
    if (res > 0) {
      ssize_t n;
      do n = ::pwrite(backingFd_, mem, size_t(res), off_t(at));
      while (n < 0 && errno == EINTR);
      res = n < 0 ? -errno : int(n);
    }
    OnExtentCompletion(q, tag, index, res);
    return;
  }
  if (e.kind == kSync) {
    if (int err = syncError_.load(std::memory_order_relaxed)) {
      OnExtentCompletion(q, tag, index, -err);
      return;
    }
    if (t.inOrder && OwnSyncCovers(t.ownSync, e.kind, e.offset, e.length, e.bufferOffset)) {
      OnExtentCompletion(q, tag, index, 0);
      return;
    }
  }
  if (e.kind == kSync && q.busy == 1) {
    // A flush with nothing else on the queue (a sync writer at QD1): fdatasync from this thread,
    // as the loop driver's worker does, rather than through an io_uring worker and back; a
    // request arriving meanwhile waits for it, as it would behind loop's. With others in flight
    // it goes to the ring, so they go on while it runs.
    int res;
    do res = ::fdatasync(backingFd_);
    while (res < 0 && errno == EINTR);
    OnExtentCompletion(q, tag, index, res < 0 ? -errno : 0);
    return;
  }
  if (segmented_ && e.kind == kRead) {
    // A read that must wait for the file: a segment at a time into the tag's own buffer, which
    // holds one at a time.
    if (t.bufferBusy) {
      t.waiting.push_back(index);
      return;
    }
    mem = TagBuffer(q, tag);
    left = std::min(left, tagBufferBytes_);
  }
  io_uring_sqe* sqe = q.ring.Sqe();
  if (!sqe) {
    OnExtentCompletion(q, tag, index, -EAGAIN);
    return;
  }
  // Registered request buffers are addressed by offset.
  void* fixed = reinterpret_cast<void*>(uintptr_t(within));
  switch (e.kind) {
    case kRead:
      if (zeroCopy_) {
        io_uring_prep_read_fixed(sqe, backingFd_, fixed, left, at, tag);
      } else {
        io_uring_prep_read(sqe, backingFd_, mem, left, at);
        t.bufferBusy = segmented_;  // until OnBackingCompletion has copied it into the request
      }
      break;
    case kWrite:  // only in place
      io_uring_prep_write_fixed(sqe, backingFd_, fixed, left, at, tag);
      break;
    case kSync:
      io_uring_prep_fsync(sqe, backingFd_, IORING_FSYNC_DATASYNC);
      break;
    default:  // kZero
      io_uring_prep_fallocate(sqe, backingFd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, e.offset, e.length);
      break;
  }
  if (inPlace && e.kind == kWrite) sqe->flags |= IOSQE_ASYNC;
  sqe->user_data = kExtentBit | (uint64_t(tag) << 16) | index;
  q.backingInFlight.fetch_add(1, std::memory_order_relaxed);
}

// Copies between the tag buffer and the request's own pages (UBLK_F_USER_COPY): toRequest for
// reads, from the request for writes. Returns the bytes copied (all of them) or -errno.
int Device::CopyRequest(Queue& q, uint16_t tag, uint32_t within, uint8_t* mem, uint32_t length, bool toRequest) {
  off_t pos = UserCopyOffset(q.id, tag, within);
  ssize_t n;
  do n = toRequest ? ::pwrite(charFd_.get(), mem, length, pos) : ::pread(charFd_.get(), mem, length, pos);
  while (n < 0 && errno == EINTR);
  if (n < 0) return -errno;
  return uint32_t(n) == length ? int(n) : -EIO;  // the request is shorter than the engine thinks
}

void Device::Commit(Queue& q, uint16_t tag, int32_t result) {
  Tag& t = q.tags[tag];
  // A flush whose own sync failed fails, whatever the engine answered for it.
  if (t.ownSyncError && result >= 0) result = -t.ownSyncError;
  t.ownSync = OwnSync{};
  t.ownSyncError = 0;
  if (q.busy > 0) q.busy--;
  t.state.store(uint8_t(TagState::kFetching));
  t.extents.clear();
  t.inOrder = false;
  t.commitHere = false;
  t.commitAfter = false;
  t.next = 0;
  QueueCommand(q, tag, kIoCommitAndFetch, result);
}

// Handles every completion waiting on the ring.
void Device::Reap(Queue& q) {
  io_uring_cqe* cqe;
  while (io_uring_peek_cqe(q.ring.get(), &cqe) == 0) {
    uint64_t data = cqe->user_data;
    int res = cqe->res;
    io_uring_cqe_seen(q.ring.get(), cqe);
    if (data & kExtentBit) {
      q.backingInFlight.fetch_sub(1, std::memory_order_relaxed);
      OnBackingCompletion(q, uint16_t(data >> 16), uint16_t(data & 0xffff), res);
    } else if (data == kWakeData) {
      q.arrivals++;  // the engine's answers, or close (AdaptPoll)
      TakeInbox(q);
      if (!q.exiting) ArmWake(q);
    } else if (data & kChainBit) {
      q.backingInFlight.fetch_sub(1, std::memory_order_relaxed);
      OnChainCompletion(q, uint16_t(data >> 16), uint16_t(data >> 32), uint16_t(data), res);
    } else if (data & kChainCommit) {
      // The commit of a chained read: cancelled when a step before it failed (the tag went on
      // the ordinary way, OnChainCompletion); otherwise the tag's next request, as any command.
      uint16_t tag = uint16_t(data), seq = uint16_t(data >> 32);
      q.arrivals++;  // the tag's next request (AdaptPoll)
      if (tag >= depth_) continue;
      Tag& t = q.tags[tag];
      if (res == -ECANCELED && t.broken == seq) continue;
      if (t.chain && t.chainSeq == seq) ChainDone(q, tag);  // its steps' completions came first
      OnCommandCompletion(q, tag, res);
    } else {
      q.arrivals++;  // the tag's next request (AdaptPoll)
      OnCommandCompletion(q, uint16_t(data), res);
    }
  }
}

// Records validated on the main thread; a tag whose state moved on since (a JS bug: the same tag
// submitted twice) is skipped rather than run twice.
void Device::ApplySubmit(Queue& q, const double* r, size_t n) {
  for (size_t i = 0; i + 3 <= n;) {
    auto tag = uint16_t(r[i]);
    auto count = size_t(r[i + 2]);
    Tag& t = q.tags[tag];
    if (t.state.load() != uint8_t(TagState::kEngine)) {
      SetLastError("submit: tag " + std::to_string(tag) + " of queue " + std::to_string(q.id) + " was submitted twice");
      i += 3 + 4 * count;
      continue;
    }
    t.needsEngine = r[i + 1] == kSubmitNeedsEngine;
    t.inOrder = r[i + 1] == kSubmitInOrder;
    t.fast = false;
    t.redirect = false;
    t.state.store(uint8_t(TagState::kRunning));
    t.error = 0;
    // One extra count while queueing, so an extent failing at once cannot finish the tag early.
    t.pending = uint32_t(count) + 1;
    t.extents.clear();
    for (size_t k = 0; k < count; k++) {
      const double* e = r + i + 3 + 4 * k;
      t.extents.push_back(Extent{uint8_t(e[0]), uint64_t(e[1]), uint32_t(e[2]), uint32_t(e[3]), 0});
    }
    if (t.inOrder) {
      // The rest start one at a time from OnExtentCompletion.
      t.next = 1;
      QueueExtent(q, tag, 0);
    } else {
      for (size_t k = 0; k < count; k++) QueueExtent(q, tag, uint16_t(k));
    }
    if (--t.pending == 0) ExtentsFinished(q, tag);
    i += 3 + 4 * count;
  }
}

void Device::ApplyComplete(Queue& q, const int32_t* pairs, size_t n) {
  for (size_t i = 0; i + 1 < n; i += 2) {
    int32_t tag = pairs[i], result = pairs[i + 1];
    Tag& t = q.tags[tag];
    uint8_t state = t.state.load();
    if (state != uint8_t(TagState::kEngine) && state != uint8_t(TagState::kWaiting)) continue;
    // Reads and writes complete with their full byte count; flush, discard and zeroes with 0.
    Commit(q, uint16_t(tag), result < 0 ? result : int32_t(t.bytes));
    if (t.redirect) {
      // A fast write the engine has now redirected (or failed): the state may change again.
      t.redirect = false;
      q.fastInFlight.fetch_sub(1, std::memory_order_seq_cst);
    }
  }
}

void Device::OnCommandCompletion(Queue& q, uint16_t tag, int res) {
  if (tag >= depth_) return;
  Tag& t = q.tags[tag];
  if (res == UBLK_IO_RES_OK) {
    OnRequest(q, tag);
    return;
  }
  if (t.state.load() == uint8_t(TagState::kDead)) return;
  // -ENODEV: the device is going away (stop, or the ring is being torn down). Anything else
  // means this tag cannot be served any more either.
  if (res != UBLK_IO_RES_ABORT) {
    SetLastError(ErrnoMessage(-res, "ublk device " + std::to_string(devId_) + " queue " + std::to_string(q.id) +
                                        " tag " + std::to_string(tag)));
  }
  t.state.store(uint8_t(TagState::kDead));
  if (q.live > 0) q.live--;
}

void Device::OnRequest(Queue& q, uint16_t tag) {
  Tag& t = q.tags[tag];
  const IoDesc* d = reinterpret_cast<const IoDesc*>(q.descriptors.data()) + tag;
  uint32_t opFlags = __atomic_load_n(&d->op_flags, __ATOMIC_ACQUIRE);
  t.op = uint8_t(opFlags & 0xff);
  // Descriptors count 512-byte sectors whatever the logical block size.
  t.bytes = (t.op == UBLK_IO_OP_READ || t.op == UBLK_IO_OP_WRITE) ? d->nr_sectors * 512u : 0;
  t.offset = d->start_sector * 512;
  t.since.store(NowNs(), std::memory_order_relaxed);
  q.busy++;
  if (ServeFast(q, tag)) return;
  ToEngine(q, tag, opFlags & UBLK_IO_F_FUA, double(d->nr_sectors) * 512.0);
}

// The request goes to the engine, which plans it (the next delivery).
void Device::ToEngine(Queue& q, uint16_t tag, bool fua, double length) {
  Tag& t = q.tags[tag];
  t.state.store(uint8_t(TagState::kEngine));
  if (t.op == UBLK_IO_OP_FLUSH && target_ == Target::kMaster) q.ownSyncTag = tag;
  double record[kRequestFields] = {double(tag), double(t.op), double(fua ? kRequestFua : 0), double(t.offset), length};
  q.outRequests.insert(q.outRequests.end(), record, record + kRequestFields);
}

// Serves the request here when the engine's publication decides it (serving.h). The count of
// fast requests in flight goes up before the decision reads the mode, and down once the backing
// I/O is done (for a write the engine must redirect, once the engine has): the engine turns the
// mode off and then waits for the count to reach 0, so no fast request decided under the old
// mode is still running when the state changes (docs/serving.md).
bool Device::ServeFast(Queue& q, uint16_t tag) {
  if (!published_.words) return false;
  Tag& t = q.tags[tag];
  const IoDesc* d = reinterpret_cast<const IoDesc*>(q.descriptors.data()) + tag;
  q.fastInFlight.fetch_add(1, std::memory_order_seq_cst);
  t.extents.clear();
  uint64_t length = uint64_t(d->nr_sectors) * 512;
  Fast fast = PlanFast(published_, target_, __atomic_load_n(&d->op_flags, __ATOMIC_RELAXED), t.offset, length, &t.extents);
  if (fast == Fast::kEngine) {
    t.extents.clear();
    if (CommitHere(q, tag)) return true;
    q.fastInFlight.fetch_sub(1, std::memory_order_seq_cst);
    return false;
  }
  t.fast = true;
  t.inOrder = fast == Fast::kServeInOrder;
  t.redirect = fast == Fast::kServeThenRedirect || fast == Fast::kServeRedirectCommit;
  t.commitAfter = fast == Fast::kServeThenCommit || fast == Fast::kServeRedirectCommit;
  t.needsEngine = false;
  t.error = 0;
  t.state.store(uint8_t(TagState::kFast));
  if (ChainRead(q, tag)) return true;
  size_t count = t.extents.size();
  t.pending = uint32_t(count) + 1;
  if (t.inOrder) {
    // The rest start one at a time from OnExtentCompletion.
    t.next = 1;
    QueueExtent(q, tag, 0);
  } else {
    for (size_t k = 0; k < count; k++) QueueExtent(q, tag, uint16_t(k));
  }
  if (--t.pending == 0) ExtentsFinished(q, tag);
  return true;
}

// A master flush that must commit, when all there is to commit is first touches the queue
// threads redirected themselves: this thread builds the map commit (Redirector::CaptureCommit
// encodes the pages and the superblock into the metadata buffer) and runs its steps in order, as
// it runs the engine's (docs/serving.md, "A flush's commit on its queue thread"). Counted as a
// fast request from ServeFast's increment on, so a state change waits for it. Before, each such
// flush waited for the Node main thread to wake, capture and encode the commit and hand it back:
// 2.5-4.7 ms of the flush in the never-written first-touch job at QD1 with fsync (6.12 VM,
// TCG), against 0.45-0.56 ms for the steps themselves (docs/benchmarks.md). Measured in one
// 6.12 VM, a pair per build, builds alternating, 6 s each: never written, medians of six 246
// IOPS before and 386 after; into a written change area, 415-422 before and 936-947 after.
bool Device::CommitHere(Queue& q, uint16_t tag) {
  Tag& t = q.tags[tag];
  if (t.op != UBLK_IO_OP_FLUSH || target_ != Target::kMaster || published_.Word(published::kCommitPending) == 0) {
    return false;
  }
  t.error = 0;
  return StartCommit(q, tag);
}

// Captures a commit of the threads' redirects for the tag (a flush, or a FUA write whose write is
// done) and starts its steps, in order; false, with nothing started, when the redirector declines.
bool Device::StartCommit(Queue& q, uint16_t tag) {
  Tag& t = q.tags[tag];
  t.extents.clear();
  if (!published_.redirector || !meta_ ||
      !published_.redirector->CaptureCommit(published_, const_cast<uint8_t*>(meta_), metaBytes_, &t.extents)) {
    t.extents.clear();
    return false;
  }
  t.fast = true;
  t.inOrder = true;
  t.commitHere = true;
  t.redirect = false;
  t.commitAfter = false;
  t.needsEngine = false;
  t.state.store(uint8_t(TagState::kFast));
  t.pending = uint32_t(t.extents.size()) + 1;
  t.next = 1;
  QueueExtent(q, tag, 0);
  if (--t.pending == 0) ExtentsFinished(q, tag);
  return true;
}

// A FUA write in a snapshot whose write to the change area is done (docs/serving.md, "A FUA
// write's commit on its queue thread"): a first touch is redirected here, at once and alone (it
// cannot wait for the round's others: its commit must hold it), then the commit is built here,
// its first fdatasync making the write durable. False when either is declined: the engine then
// takes the whole request, which its plan writes again to the same blocks (their bits set or not,
// the change area at their own offset) and commits; the write counted in fastInFlight until now,
// so no state change came between it and what was decided here.
bool Device::CommitAfterWrite(Queue& q, uint16_t tag) {
  Tag& t = q.tags[tag];
  if (t.redirect) {
    const uint32_t shift = published_.geometry.blockShift;
    uint64_t range[2] = {t.offset >> shift, (t.offset + t.bytes) >> shift};
    if (!published_.redirector->Redirect(published_, range, 1)) return false;
    t.redirect = false;
    TakeRedirectsSoon();
  }
  return StartCommit(q, tag);
}

// The engine takes the threads' redirects at its next hold (a commit, a plan, a status); past this
// many, it is woken for them: their journal records count towards its commit for the journal's
// length, and each waits in the redirector's list (24 bytes) until then.
void Device::TakeRedirectsSoon() {
  if (published_.Word(published::kRedirected) >= kTakeRedirectsAfter && async_) uv_async_send(async_);
}

// A fast read of one extent, served with its commit in one chain of linked ring entries: the
// backing read (from the page cache only: RWF_NOWAIT), the copy into the request (user copy
// without zero copy: a write to /dev/ublkcN; with zero copy the read lands in the request's own
// pages; without user copy the kernel copies at the commit) and the commit. The queue thread
// makes one io_uring_enter per request instead of three syscalls (preadv2, the copy, the
// enter). Measured in the VM (TCG, ext4 on brd), against the same build without chains, one VM
// each, medians of 6 (QD1) and 3 (QD32) alternating 4 s runs of 4 KiB random reads: on 6.12
// (user copy) 2988 against 2783 IOPS at QD1 and 55.5k against 44.0k at QD32 (the C server 3707
// and 43.8k); on 7.3 (zero copy) 3252 against 3210 and 57.0k against 52.3k. A step that fails
// or falls short (not all cached, an error) breaks the chain: the steps after it come back
// cancelled, the commit never reaches the kernel, and the extent starts again the ordinary way
// (QueueExtent), which goes to the file for what the cache lacks.
bool Device::ChainRead(Queue& q, uint16_t tag) {
  Tag& t = q.tags[tag];
  if (t.op != UBLK_IO_OP_READ || t.extents.size() != 1 || !nowaitReads_.load(std::memory_order_relaxed)) return false;
  const Extent& e = t.extents[0];
  bool copy = segmented_;
  if (e.kind != kRead || e.bufferOffset != 0 || e.length != t.bytes) return false;
  if (copy ? e.length > kChainCopyBytes : !zeroCopy_ && e.length > tagBufferBytes_) return false;
  // The chain's entries must reach the kernel together: a full SQ would submit part of it.
  if (io_uring_sq_space_left(q.ring.get()) < (copy ? 3u : 2u)) return false;
  uint64_t seq = ++t.chainSeq;
  if (seq == t.broken) seq = ++t.chainSeq;  // never the number of an old broken chain (0 is none)
  if (seq == 0) seq = ++t.chainSeq;
  uint64_t steps = kChainBit | (seq << 32) | (uint64_t(tag) << 16);
  io_uring_sqe* sqe = io_uring_get_sqe(q.ring.get());
  if (zeroCopy_) {
    io_uring_prep_read_fixed(sqe, backingFd_, nullptr, e.length, e.offset, tag);
  } else {
    io_uring_prep_read(sqe, backingFd_, TagBuffer(q, tag), e.length, e.offset);
  }
  sqe->rw_flags = RWF_NOWAIT;
  sqe->flags |= IOSQE_IO_LINK;
  sqe->user_data = steps | kStepRead;
  q.backingInFlight.fetch_add(1, std::memory_order_relaxed);
  if (copy) {
    sqe = io_uring_get_sqe(q.ring.get());
    io_uring_prep_write(sqe, charFd_.get(), TagBuffer(q, tag), e.length, UserCopyOffset(q.id, tag, 0));
    sqe->flags |= IOSQE_IO_LINK;
    sqe->user_data = steps | kStepCopy;
    q.backingInFlight.fetch_add(1, std::memory_order_relaxed);
  }
  t.chain = kChainRead;
  QueueCommand(q, tag, kIoCommitAndFetch, int32_t(e.length), kChainCommit | (seq << 32));
  return true;
}

void Device::OnChainCompletion(Queue& q, uint16_t tag, uint16_t seq, uint16_t step, int res) {
  if (tag >= depth_) return;
  Tag& t = q.tags[tag];
  if (t.chain == 0 || t.chainSeq != seq) return;  // a step after the one that failed: cancelled
  uint32_t length = t.extents.empty() ? 0 : t.extents[0].length;
  if (res == int(length) && length > 0) {
    if (step == kStepRead && segmented_) {
      // The backing file is done with: a state change waiting for fast requests may go on.
      q.fastInFlight.fetch_sub(1, std::memory_order_seq_cst);
      t.chain = kChainCopy;
    } else {
      ChainDone(q, tag);  // the last step (the commit follows in the kernel)
    }
    return;
  }
  // The chain broke here; the steps after it and its commit come back cancelled (Reap).
  t.chain = 0;
  t.broken = seq;
  if (step == kStepCopy) {
    // The read is done (and no longer counted in flight); the request fails, as a failed copy
    // does from QueueExtent.
    t.fast = false;
    q.counters.errors.fetch_add(1, std::memory_order_relaxed);
    Commit(q, tag, res < 0 ? res : -EIO);
    return;
  }
  if (res == -EOPNOTSUPP) nowaitReads_.store(false, std::memory_order_relaxed);  // this file system never can
  if (res < 0 && res != -EAGAIN && res != -EOPNOTSUPP) {
    t.error = -res;
    ExtentsFinished(q, tag);
    return;
  }
  // Not (all) in the page cache: the ordinary way, from the start of the extent.
  t.pending = 2;
  QueueExtent(q, tag, 0);
  if (--t.pending == 0) ExtentsFinished(q, tag);
}

// A chained read went through: its commit has reached the kernel (or is about to, the next
// entry of the chain), so the tag is the kernel's again, as after Commit.
void Device::ChainDone(Queue& q, uint16_t tag) {
  Tag& t = q.tags[tag];
  if (t.chain == kChainRead) q.fastInFlight.fetch_sub(1, std::memory_order_seq_cst);
  t.chain = 0;
  t.fast = false;
  Counters& c = q.counters;
  c.reads.fetch_add(1, std::memory_order_relaxed);
  c.bytesRead.fetch_add(t.bytes, std::memory_order_relaxed);
  if (q.busy > 0) q.busy--;
  t.state.store(uint8_t(TagState::kFetching));
  t.extents.clear();
}

// A backing I/O from the ring. A segmented read has its segment in the tag's buffer: it is copied
// into the request before the extent goes on, and the buffer is then free for the next segment,
// this extent's or a waiting one's.
void Device::OnBackingCompletion(Queue& q, uint16_t tag, uint16_t index, int res) {
  if (tag >= depth_ || index >= q.tags[tag].extents.size()) return;
  Tag& t = q.tags[tag];
  Extent& e = t.extents[index];
  if (!segmented_ || e.kind != kRead) {
    OnExtentCompletion(q, tag, index, res);
    return;
  }
  if (res > 0) res = CopyRequest(q, tag, e.bufferOffset + e.done, TagBuffer(q, tag), uint32_t(res), true);
  t.bufferBusy = false;
  OnExtentCompletion(q, tag, index, res);
  // Waiting extents count in t.pending, so the tag cannot have finished while any wait; each
  // either completes at once or takes the buffer again.
  while (!t.bufferBusy && !t.waiting.empty()) {
    uint16_t next = t.waiting.back();
    t.waiting.pop_back();
    QueueExtent(q, tag, next);
  }
}

void Device::OnExtentCompletion(Queue& q, uint16_t tag, uint16_t index, int res) {
  if (tag >= depth_ || index >= q.tags[tag].extents.size()) return;
  Tag& t = q.tags[tag];
  Extent& e = t.extents[index];
  if (res < 0) {
    if (!t.error) t.error = -res;
    if (e.kind == kSync) SyncFailed(q, tag, -res);
  } else if (e.kind == kRead || e.kind == kWrite || e.kind == kMeta) {
    if (res == 0) {
      // End of file (or no progress): the backing file is shorter than the engine thinks.
      if (!t.error) t.error = EIO;
    } else {
      e.done += uint32_t(res);
      if (e.done < e.length) {
        QueueExtent(q, tag, index);
        return;
      }
    }
  }
  if (t.inOrder) {
    size_t left = t.extents.size() - t.next;  // not started yet
    if (!t.error && left > 0) {
      // This one's count goes; the next one's keeps the tag from finishing.
      --t.pending;
      QueueExtent(q, tag, uint16_t(t.next++));
      return;
    }
    t.pending -= uint32_t(left);  // after an error they never start
    t.next = uint32_t(t.extents.size());
  }
  if (--t.pending == 0) ExtentsFinished(q, tag);
}

void Device::ExtentsFinished(Queue& q, uint16_t tag) {
  Tag& t = q.tags[tag];
  if (t.fast && t.commitAfter) {
    // A FUA write's write is done. A failed one ends as any fast write that failed, below.
    t.commitAfter = false;
    if (!t.error) {
      if (CommitAfterWrite(q, tag)) return;
      t.fast = false;
      t.redirect = false;
      t.extents.clear();
      ToEngine(q, tag, true, double(t.bytes));
      q.fastInFlight.fetch_sub(1, std::memory_order_seq_cst);
      return;
    }
  }
  if (t.fast && t.redirect) {
    // The engine redirects the blocks (and counts the write), then completes it (ApplyComplete).
    t.fast = false;
    t.state.store(uint8_t(TagState::kWaiting));
    double record[kRedirectFields] = {double(tag), double(t.error), double(t.offset), double(t.bytes)};
    q.outRedirects.insert(q.outRedirects.end(), record, record + kRedirectFields);
    return;
  }
  if (t.fast) {
    t.fast = false;
    // Durable (or failed) now: the commit's bookkeeping moves on before the flush completes.
    if (t.commitHere && published_.redirector->CommitDone(published_, t.error)) {
      wakeEngine_.store(true);
      if (async_) uv_async_send(async_);
    }
    t.commitHere = false;
    Counters& c = q.counters;
    if (t.error) c.errors.fetch_add(1, std::memory_order_relaxed);
    else if (t.op == UBLK_IO_OP_READ) c.reads.fetch_add(1, std::memory_order_relaxed), c.bytesRead.fetch_add(t.bytes, std::memory_order_relaxed);
    else if (t.op == UBLK_IO_OP_WRITE) c.writes.fetch_add(1, std::memory_order_relaxed), c.bytesWritten.fetch_add(t.bytes, std::memory_order_relaxed);
    else c.flushes.fetch_add(1, std::memory_order_relaxed);
    Commit(q, tag, t.error ? -t.error : int32_t(t.bytes));
    q.fastInFlight.fetch_sub(1, std::memory_order_seq_cst);
    return;
  }
  if (t.needsEngine) {
    t.state.store(uint8_t(TagState::kWaiting));
    q.outOrdered.push_back(tag);
    q.outOrdered.push_back(t.error);
    return;
  }
  q.outDone.push_back(tag);
  q.outDone.push_back(t.error);
  Commit(q, tag, t.error ? -t.error : int32_t(t.bytes));
}

// ---------------------------------------------------------------- close and reports

// close() returns the completions not yet delivered, as (queue, tag, errno) triples: those
// requests are finished in the kernel, and the engine must hear how they ended.
Napi::Value Device::Close(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::vector<int32_t> pending;
  // The threads first: after they are gone, the outboxes are final.
  StopThreads();
  for (auto& q : queues_) {
    std::lock_guard<std::mutex> lock(q->mu);
    for (size_t i = 0; i + 1 < q->done.size(); i += 2) pending.insert(pending.end(), {int32_t(q->id), q->done[i], q->done[i + 1]});
    q->done.clear();
  }
  Shutdown();
  Napi::Int32Array out = Napi::Int32Array::New(env, pending.size());
  std::copy(pending.begin(), pending.end(), out.Data());
  return out;
}

// Asks every queue thread to stop serving and joins it. Each waits for its backing I/O to finish
// first: that I/O lands in the tag buffers or the requests' pages, which must outlive it. Backing
// I/O on a backing store that hangs (a dead NFS server) would hold the join, and the main thread,
// as long as it hangs; every backing I/O serves a request, so UblkDevice.stop() closes the queues
// only after STOP_DEV has completed every request (bounded: a STOP_DEV that times out leaves the
// queues open and names the requests), and a start or takeover that failed has served none but
// the partition scan's reads.
void Device::StopThreads() {
  for (auto& q : queues_) {
    if (!q->thread.joinable()) continue;
    {
      std::lock_guard<std::mutex> lock(q->mu);
      q->closeRequested = true;
      q->wakePending = true;
    }
    uint64_t one = 1;
    ssize_t n;
    do n = ::write(q->wake.get(), &one, sizeof one);
    while (n < 0 && errno == EINTR);
    q->thread.join();
  }
}

void Device::Shutdown() {
  StopThreads();
  CloseHandle(async_);
  // Closing the rings cancels the outstanding FETCHes: the kernel sees the server go away.
  for (auto& q : queues_) q->ring.Close();
  queues_.clear();  // unmaps descriptors and buffers
  charFd_.Reset();
  onEvents_.Reset();
  eventsRef_.Reset();
  publishedRef_.Reset();
  published_ = Published();
  events_ = nullptr;
}

// inspect(queue): where each tag is, since when, and what the queue holds for JS, for the
// daemon's report of a request outstanding far too long. Cheap, but only called when one is.
Napi::Value Device::Inspect(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Queue& q = QueueArg(env, info[0]);
  Napi::Uint8Array states = Napi::Uint8Array::New(env, depth_);
  Napi::Float64Array ages = Napi::Float64Array::New(env, depth_);
  uint64_t now = NowNs();
  for (uint32_t tag = 0; tag < depth_; tag++) {
    Tag& t = q.tags[tag];
    states[tag] = t.state.load();
    uint64_t since = t.since.load(std::memory_order_relaxed);
    ages[tag] = since && now > since ? double(now - since) / 1e6 : 0;
  }
  Napi::Object out = Napi::Object::New(env);
  out.Set("states", states);
  out.Set("ages", ages);
  {
    std::lock_guard<std::mutex> lock(q.mu);
    out.Set("requests", double(q.requests.size() / kRequestFields));
    out.Set("ordered", double(q.ordered.size() / 2));
    out.Set("done", double(q.done.size() / 2));
    out.Set("redirects", double(q.redirects.size() / kRedirectFields));
    out.Set("failure", q.failure.empty() ? env.Null() : Napi::String::New(env, q.failure));
  }
  out.Set("backingInFlight", double(q.backingInFlight.load()));
  out.Set("fastInFlight", double(q.fastInFlight.load()));
  return out;
}

// fastInFlight(): the fast-path requests of every queue between their decision and the end of
// their backing I/O (the engine waits for 0 after turning the fast path off).
Napi::Value Device::FastInFlight(const Napi::CallbackInfo& info) {
  uint64_t n = 0;
  for (auto& q : queues_) n += q->fastInFlight.load(std::memory_order_seq_cst);
  return Napi::Number::New(info.Env(), double(n));
}

// stats(): what the fast path served, summed over the queues: reads, writes, flushes, bytes
// read, bytes written, errors; then the queue threads' polls that caught a request (or the
// engine's answers) and that ran out.
Napi::Value Device::Stats(const Napi::CallbackInfo& info) {
  Napi::Float64Array out = Napi::Float64Array::New(info.Env(), 8);
  for (auto& q : queues_) {
    const Counters& c = q->counters;
    out[0] += double(c.reads.load()), out[1] += double(c.writes.load()), out[2] += double(c.flushes.load());
    out[3] += double(c.bytesRead.load()), out[4] += double(c.bytesWritten.load()), out[5] += double(c.errors.load());
    out[6] += double(c.pollsCaught.load()), out[7] += double(c.pollsRanOut.load());
  }
  return out;
}

Napi::Value Device::LastError(const Napi::CallbackInfo& info) {
  std::lock_guard<std::mutex> lock(errorMu_);
  if (lastError_.empty()) return info.Env().Null();
  return Napi::String::New(info.Env(), lastError_);
}

}  // namespace cldd
