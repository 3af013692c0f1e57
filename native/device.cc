#include "device.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "ublk.h"

namespace cldd {

namespace {
enum Kind : uint8_t { kRead = 0, kWrite = 1, kZero = 2 };
// user_data: ublk commands carry the tag; backing I/O sets the top bit and adds the extent index.
constexpr uint64_t kExtentBit = 1ULL << 63;
constexpr uint32_t kMaxExtents = 1u << 16;
// With zero copy, extents at least this long are read or written in place (see QueueExtent).
// Measured in the VM on Linux 7.3 against copying: reads of 64 KiB and more a draw or better
// (512 KiB: twice as fast); writes in place need a worker thread, which made 64 KiB writes
// slower, 256 KiB a draw and 512 KiB twice as fast.
constexpr uint32_t kInPlaceReadBytes = 16u << 10;
constexpr uint32_t kInPlaceWriteBytes = 256u << 10;
// How long completed plans may wait to ride along with the next delivery to JS. Their finish()
// is bookkeeping (the kernel has the result already); a drain or a lock waits at most this long.
constexpr uint64_t kDoneDelayMs = 2;
// Rounds of reap-and-deliver in one wake-up before the event loop gets a turn (timers, the
// control socket, merges). What is left over is delivered from a zero-delay timer.
constexpr int kServeRounds = 16;
// Doubles per request record in the events buffer; ordered and done entries are pairs.
constexpr size_t kRequestFields = 5;

size_t RoundUp(size_t n, size_t to) { return (n + to - 1) / to * to; }
}  // namespace

Napi::Function Device::Define(Napi::Env env) {
  return DefineClass(env, "Device",
                     {
                         InstanceMethod<&Device::Start>("start"),
                         InstanceMethod<&Device::Submit>("submit"),
                         InstanceMethod<&Device::Complete>("complete"),
                         InstanceMethod<&Device::Close>("close"),
                         InstanceMethod<&Device::Inspect>("inspect"),
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
  onEvents_ = Napi::Persistent(options.Get("onEvents").As<Napi::Function>());
  std::string name = "ublk device " + std::to_string(devId_);
  if (queues == 0 || depth_ == 0 || depth_ > kMaxDepth || bufferBytes_ == 0 || bufferBytes_ % 512) {
    throw CodeError(env, "EINVAL", name + ": bad queue count, depth or buffer size");
  }
  Napi::Float64Array events = options.Get("events").As<Napi::Float64Array>();
  if (events.ElementLength() < (kRequestFields + 4) * depth_) {
    throw CodeError(env, "EINVAL", name + ": the events buffer must hold " + std::to_string((kRequestFields + 4) * depth_) + " numbers");
  }
  eventsRef_ = Napi::Persistent(events);
  events_ = events.Data();
  std::string path = "/dev/ublkc" + std::to_string(devId_);
  charFd_.Reset(::open(path.c_str(), O_RDWR | O_CLOEXEC));
  if (!charFd_.valid()) throw ErrnoError(env, errno, "open " + path);
  // The thread that serves the queues writes to the backing file on behalf of the block layer:
  // under memory pressure it must not be throttled like an ordinary writer. Best effort: it
  // needs CAP_SYS_RESOURCE and only changes reclaim behaviour, not correctness.
  ::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0);

  size_t page = size_t(::sysconf(_SC_PAGESIZE));
  size_t stride = RoundUp(kMaxDepth * sizeof(IoDesc), page);
  context_ = std::make_unique<Napi::AsyncContext>(env, "cldd:ublk-queue");
  for (uint32_t id = 0; id < queues; id++) {
    auto q = std::make_unique<Queue>();
    q->id = uint16_t(id);
    q->tags.resize(depth_);
    q->requests.reserve(kRequestFields * depth_);
    q->ordered.reserve(2 * depth_);
    q->done.reserve(2 * depth_);
    int err = q->descriptors.Map(RoundUp(depth_ * sizeof(IoDesc), page), PROT_READ, MAP_SHARED | MAP_POPULATE,
                                 charFd_.get(), off_t(id * stride));
    if (err) throw ErrnoError(env, err, name + ": map the descriptors of queue " + std::to_string(id));
    // Untouched tag buffers cost address space only, and a touched one only the pages its
    // requests used: without huge pages. With transparent huge pages each 4 KiB request faulted
    // in 2 MiB, two tags' whole buffers: measured in the VM with the defaults (depth 128 x 1 MiB),
    // the daemon's RSS grew by 73 MiB during 4 KiB reads and reached 168-201 MiB, most of it this
    // mapping. Best effort: a kernel without THP has nothing to turn off.
    err = q->buffers.Map(size_t(depth_) * bufferBytes_, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (err) throw ErrnoError(env, err, name + ": allocate the buffers of queue " + std::to_string(id));
    ::madvise(q->buffers.data(), q->buffers.size(), MADV_NOHUGEPAGE);
    unsigned entries = 64;
    while (entries < 2 * depth_) entries *= 2;
    q->ring.Init(env, entries, 0, name + " queue " + std::to_string(id));
    if (zeroCopy_) {
      // One empty slot per tag: the kernel installs each request's pages at index = tag.
      int rc = io_uring_register_buffers_sparse(q->ring.get(), depth_);
      if (rc < 0) throw ErrnoError(env, -rc, name + ": register the buffer table of queue " + std::to_string(id));
    }
    Queue* raw = q.get();
    q->ring.Watch([this, raw] { OnCompletions(*raw); });
    queues_.push_back(std::move(q));
  }
  uv_loop_t* loop = nullptr;
  napi_get_uv_event_loop(env, &loop);
  deliverTimer_ = new uv_timer_t;
  uv_timer_init(loop, deliverTimer_);
  deliverTimer_->data = this;
  uv_unref(reinterpret_cast<uv_handle_t*>(deliverTimer_));
  cleanup_.Add(env, [](void* self) { static_cast<Device*>(self)->Shutdown(); }, this);
}

Device::Queue& Device::QueueArg(Napi::Env env, const Napi::Value& value) {
  uint32_t id = value.As<Napi::Number>().Uint32Value();
  if (id >= queues_.size() || !queues_[id]->ring.open()) {
    throw CodeError(env, "EINVAL", "ublk device " + std::to_string(devId_) + ": no open queue " + std::to_string(id));
  }
  return *queues_[id];
}

void Device::QueueCommand(Queue& q, uint16_t tag, uint32_t op, int32_t result) {
  io_uring_sqe* sqe = q.ring.Sqe();
  if (!sqe) {
    // The ring refused its queued entries: the queue cannot go on.
    lastError_ = "queue " + std::to_string(q.id) + ": the ring refused submissions";
    q.tags[tag].state = TagState::kDead;
    return;
  }
  // liburing 2.3 has no URING_CMD helper: a zeroed SQE with the opcode and command filled in.
  std::memset(sqe, 0, sizeof *sqe);
  sqe->opcode = IORING_OP_URING_CMD;
  sqe->fd = charFd_.get();
  sqe->cmd_op = encode_ ? EncodeIo(op) : op;
  uint64_t buffer = zeroCopy_ ? 0 : reinterpret_cast<uintptr_t>(q.buffers.data() + size_t(tag) * bufferBytes_);
  IoCmd cmd{q.id, tag, result, buffer};
  std::memcpy(sqe->cmd, &cmd, sizeof cmd);
  // Automatic registration reads its buffer index from the SQE's addr (index in bits 0-15, no
  // flags): the tag's request is registered there when it arrives, unregistered at its commit.
  if (zeroCopy_) sqe->addr = tag;
  sqe->user_data = tag;
}

// How an extent's data moves. Without zero copy the kernel copies each request between its
// pages and the tag buffer (at FETCH for writes, at COMMIT for reads). With zero copy the
// request's pages are registered in the queue's ring at index = tag (UBLK_F_AUTO_BUF_REG) and
// the kernel copies nothing:
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
// Reads try the page cache first, from this thread and without blocking (RWF_NOWAIT): a hit
// lets the commit leave in the same io_uring_enter as the next submissions instead of a round
// trip of its own through the ring. A miss, or a part of one, goes to the ring, where it cannot
// block the event loop.
void Device::QueueExtent(Queue& q, uint16_t tag, uint16_t index) {
  Extent& e = q.tags[tag].extents[index];
  uint32_t left = e.length - e.done;
  uint64_t at = e.offset + e.done;            // in the backing file
  uint32_t within = e.bufferOffset + e.done;  // in the request
  uint8_t* mem = q.buffers.data() + size_t(tag) * bufferBytes_ + within;
  bool inPlace = zeroCopy_ && ((e.kind == kRead && left >= kInPlaceReadBytes) || (e.kind == kWrite && left >= kInPlaceWriteBytes));
  if (e.kind == kRead && nowaitReads_ && !inPlace) {
    iovec iov{mem, left};
    ssize_t n;
    do n = ::preadv2(backingFd_, &iov, 1, off_t(at), RWF_NOWAIT);
    while (n < 0 && errno == EINTR);
    if (n >= 0 || (errno != EAGAIN && errno != EOPNOTSUPP)) {
      int res = n < 0 ? -errno : int(n);
      if (n > 0 && zeroCopy_) res = CopyRequest(q, tag, within, mem, uint32_t(n), true);
      OnExtentCompletion(q, tag, index, res);
      return;
    }
    if (errno == EOPNOTSUPP) nowaitReads_ = false;  // this file system never can: stop asking
  }
  if (e.kind == kWrite && !inPlace) {
    int res = zeroCopy_ ? CopyRequest(q, tag, within, mem, left, false) : int(left);
    if (res > 0) {
      ssize_t n;
      do n = ::pwrite(backingFd_, mem, size_t(res), off_t(at));
      while (n < 0 && errno == EINTR);
      res = n < 0 ? -errno : int(n);
    }
    OnExtentCompletion(q, tag, index, res);
    return;
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
      }
      break;
    case kWrite:  // only in place
      io_uring_prep_write_fixed(sqe, backingFd_, fixed, left, at, tag);
      break;
    default:  // kZero
      io_uring_prep_fallocate(sqe, backingFd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, e.offset, e.length);
      break;
  }
  if (inPlace && e.kind == kWrite) sqe->flags |= IOSQE_ASYNC;
  sqe->user_data = kExtentBit | (uint64_t(tag) << 16) | index;
  q.backingInFlight++;
}

// Copies between the tag buffer and the request's own pages (UBLK_F_USER_COPY): toRequest for
// reads, from the request for writes. Returns the bytes copied (all of them) or -errno.
int Device::CopyRequest(Queue& q, uint16_t tag, uint32_t within, uint8_t* mem, uint32_t length, bool toRequest) {
  off_t pos = off_t(kUserCopyBase + (uint64_t(q.id) << kUserCopyQueueShift) + (uint64_t(tag) << kUserCopyTagShift) + within);
  ssize_t n;
  do n = toRequest ? ::pwrite(charFd_.get(), mem, length, pos) : ::pread(charFd_.get(), mem, length, pos);
  while (n < 0 && errno == EINTR);
  if (n < 0) return -errno;
  return uint32_t(n) == length ? int(n) : -EIO;  // the request is shorter than the engine thinks
}

void Device::Commit(Queue& q, uint16_t tag, int32_t result) {
  Tag& t = q.tags[tag];
  t.state = TagState::kFetching;
  t.extents.clear();
  QueueCommand(q, tag, kIoCommitAndFetch, result);
}

Napi::Value Device::Start(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  for (auto& q : queues_) {
    if (q->started || !q->ring.open()) continue;
    for (uint32_t tag = 0; tag < depth_; tag++) {
      q->tags[tag].state = TagState::kFetching;
      QueueCommand(*q, uint16_t(tag), kIoFetch, 0);
    }
    q->live = depth_;
    q->started = true;
    int rc = q->ring.Submit();
    if (rc < 0) throw ErrnoError(env, -rc, "ublk device " + std::to_string(devId_) + ": fetch on queue " + std::to_string(q->id));
    // A serving queue keeps the process alive until the kernel aborts its tags.
    q->ring.SetRef(true);
  }
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
  std::string error = ApplySubmit(q, r, n);
  if (!error.empty()) throw CodeError(env, "EINVAL", error);
  q.ring.Submit();
  // Called from a promise reaction (a plan that waited for a state change or a lock) rather than
  // from inside Serve: extents that finished in the direct calls above must still reach JS.
  if (!q.serving) ScheduleDelivery(q);
  return env.Undefined();
}

// Validates every record before anything is queued, so a bad record leaves no tag half-started;
// returns what was wrong, or nothing.
std::string Device::ApplySubmit(Queue& q, const double* r, size_t n) {
  for (size_t i = 0; i < n;) {
    if (i + 3 > n) return "submit: truncated plan record";
    double tag = r[i], count = r[i + 2];
    if (tag < 0 || tag >= depth_ || q.tags[size_t(tag)].state != TagState::kEngine) {
      return "submit: tag " + std::to_string(tag) + " of queue " + std::to_string(q.id) + " is not being planned";
    }
    if (count < 1 || count > kMaxExtents || i + 3 + 4 * size_t(count) > n) {
      return "submit: bad extent count for tag " + std::to_string(tag);
    }
    const Tag& t = q.tags[size_t(tag)];
    for (size_t k = 0; k < size_t(count); k++) {
      const double* e = r + i + 3 + 4 * k;
      bool zero = e[0] == double(kZero);
      // Data extents stay inside the request's buffer; zero extents only need to fit 32 bits.
      if (e[0] < 0 || e[0] > 2 || e[1] < 0 || e[2] <= 0 || e[2] > double(UINT32_MAX) ||
          (!zero && e[3] + e[2] > double(t.bytes))) {
        return "submit: extent " + std::to_string(k) + " of tag " + std::to_string(tag) + " does not fit its request";
      }
    }
    i += 3 + 4 * size_t(count);
  }
  for (size_t i = 0; i < n;) {
    auto tag = uint16_t(r[i]);
    auto count = size_t(r[i + 2]);
    Tag& t = q.tags[tag];
    t.needsEngine = r[i + 1] != 0;
    t.state = TagState::kRunning;
    t.error = 0;
    // One extra count while queueing, so an extent failing at once cannot finish the tag early.
    t.pending = uint32_t(count) + 1;
    t.extents.clear();
    for (size_t k = 0; k < count; k++) {
      const double* e = r + i + 3 + 4 * k;
      t.extents.push_back(Extent{uint8_t(e[0]), uint64_t(e[1]), uint32_t(e[2]), uint32_t(e[3]), 0});
    }
    for (size_t k = 0; k < count; k++) QueueExtent(q, tag, uint16_t(k));
    if (--t.pending == 0) ExtentsFinished(q, tag);
    i += 3 + 4 * count;
  }
  return {};
}

// complete(queue, pairs, n): the first n numbers of pairs are (tag, result) with result 0 for
// success or -errno.
Napi::Value Device::Complete(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Queue& q = QueueArg(env, info[0]);
  Napi::Int32Array pairs = info[1].As<Napi::Int32Array>();
  size_t n = std::min<size_t>(pairs.ElementLength(), info[2].As<Napi::Number>().Uint32Value());
  std::string error = ApplyComplete(q, pairs.Data(), n);
  q.ring.Submit();
  if (!q.serving) ScheduleDelivery(q);
  if (!error.empty()) throw CodeError(env, "EINVAL", error);
  return env.Undefined();
}

std::string Device::ApplyComplete(Queue& q, const int32_t* pairs, size_t n) {
  for (size_t i = 0; i + 1 < n; i += 2) {
    int32_t tag = pairs[i], result = pairs[i + 1];
    if (tag < 0 || uint32_t(tag) >= depth_ ||
        (q.tags[tag].state != TagState::kEngine && q.tags[tag].state != TagState::kWaiting)) {
      return "complete: tag " + std::to_string(tag) + " of queue " + std::to_string(q.id) + " is not waiting for the engine";
    }
    Tag& t = q.tags[tag];
    // Reads and writes complete with their full byte count; flush, discard and zeroes with 0.
    Commit(q, uint16_t(tag), result < 0 ? result : int32_t(t.bytes));
  }
  return {};
}

void Device::OnCompletions(Queue& q) {
  RunFromLoop(Env(), *context_, [&] { Serve(q, false); });
}

// Reaps the ring and delivers to JS until nothing is left to deliver. The engine's answers are
// submitted while JS runs, and backing I/O done by direct calls (writes, cached reads) finishes
// inside that submit without any completion on the ring: what it leaves in `ordered` would never
// wake the ring's poll. So every exit either has delivered everything that needs JS or arms the
// delivery timer; that is the invariant that keeps a tag from waiting for the engine forever.
// `withDone` delivers completed-plan bookkeeping too instead of deferring it.
void Device::Serve(Queue& q, bool withDone) {
  q.serving = true;
  for (int round = 0; round < kServeRounds && q.ring.open(); round++) {
    bool stopped = false;
    Reap(q, &stopped);
    if (!q.ring.open()) break;
    // Commits of plans that needed no engine go to the kernel before the engine hears of them.
    q.ring.Submit();
    if (q.requests.empty() && q.ordered.empty() && !stopped && (!withDone || q.done.empty())) break;
    DeliverEvents(q, stopped);
    withDone = false;
  }
  q.serving = false;
  ScheduleDelivery(q);
}

// Arms the delivery timer for what a queue still holds for JS: at once for requests and
// ordered completions (a tag waits on them), after kDoneDelayMs for bookkeeping only.
void Device::ScheduleDelivery(Queue& q) {
  if (!deliverTimer_ || !q.ring.open()) return;
  uint64_t delay;
  if (!q.requests.empty() || !q.ordered.empty()) delay = 0;
  else if (!q.done.empty()) delay = kDoneDelayMs;
  else return;
  uv_timer_t* timer = deliverTimer_;
  if (uv_is_active(reinterpret_cast<uv_handle_t*>(timer)) && timerDue_ <= uv_now(timer->loop) + delay) return;
  timerDue_ = uv_now(timer->loop) + delay;
  uv_timer_start(timer, &Device::OnDeliverTimer, delay, 0);
}

// Handles every completion waiting on the ring.
void Device::Reap(Queue& q, bool* stopped) {
  io_uring_cqe* cqe;
  while (q.ring.open() && io_uring_peek_cqe(q.ring.get(), &cqe) == 0) {
    uint64_t data = cqe->user_data;
    int res = cqe->res;
    io_uring_cqe_seen(q.ring.get(), cqe);
    if (data & kExtentBit) {
      q.backingInFlight--;
      OnExtentCompletion(q, uint16_t(data >> 16), uint16_t(data & 0xffff), res);
    } else {
      OnCommandCompletion(q, uint16_t(data), res, stopped);
    }
  }
}

void Device::DeliverEvents(Queue& q, bool stopped) {
  Napi::Env env = Env();
  // Each tag is in at most one list at a time, so every list fits its part of the buffer.
  size_t nRequests = q.requests.size() / kRequestFields, nOrdered = q.ordered.size() / 2, nDone = q.done.size() / 2;
  std::memcpy(events_, q.requests.data(), q.requests.size() * sizeof(double));
  double* ordered = events_ + kRequestFields * depth_;
  for (size_t i = 0; i < q.ordered.size(); i++) ordered[i] = q.ordered[i];
  double* done = ordered + 2 * depth_;
  for (size_t i = 0; i < q.done.size(); i++) done[i] = q.done[i];
  q.requests.clear();
  q.ordered.clear();
  q.done.clear();
  onEvents_.Call(Value(), {Napi::Number::New(env, q.id), Napi::Number::New(env, double(nRequests)),
                           Napi::Number::New(env, double(nOrdered)), Napi::Number::New(env, double(nDone)),
                           Napi::Boolean::New(env, stopped)});
}

void Device::OnDeliverTimer(uv_timer_t* timer) {
  auto* self = static_cast<Device*>(timer->data);
  if (!self) return;
  RunFromLoop(self->Env(), *self->context_, [self] {
    // Delivering may run JS that closes the device: index, do not iterate the vector.
    for (size_t i = 0; i < self->queues_.size(); i++) {
      Queue& q = *self->queues_[i];
      if (q.ring.open()) self->Serve(q, true);
    }
  });
}

void Device::OnCommandCompletion(Queue& q, uint16_t tag, int res, bool* stopped) {
  if (tag >= depth_) return;
  Tag& t = q.tags[tag];
  if (res == UBLK_IO_RES_OK) {
    const IoDesc* d = reinterpret_cast<const IoDesc*>(q.descriptors.data()) + tag;
    uint32_t opFlags = __atomic_load_n(&d->op_flags, __ATOMIC_ACQUIRE);
    t.state = TagState::kEngine;
    t.op = uint8_t(opFlags & 0xff);
    // Descriptors count 512-byte sectors whatever the logical block size.
    t.bytes = (t.op == UBLK_IO_OP_READ || t.op == UBLK_IO_OP_WRITE) ? d->nr_sectors * 512u : 0;
    double record[5] = {double(tag), double(t.op), double(opFlags >> 8), double(d->start_sector) * 512.0,
                        double(d->nr_sectors) * 512.0};
    q.requests.insert(q.requests.end(), record, record + 5);
    return;
  }
  if (t.state == TagState::kDead) return;
  // -ENODEV: the device is going away (stop, or the ring is being torn down). Anything else
  // means this tag cannot be served any more either.
  if (res != UBLK_IO_RES_ABORT) {
    lastError_ = ErrnoMessage(-res, "ublk device " + std::to_string(devId_) + " queue " + std::to_string(q.id) +
                                        " tag " + std::to_string(tag));
  }
  t.state = TagState::kDead;
  if (q.live > 0 && --q.live == 0) {
    *stopped = true;
    q.ring.SetRef(false);
  }
}

void Device::OnExtentCompletion(Queue& q, uint16_t tag, uint16_t index, int res) {
  if (tag >= depth_ || index >= q.tags[tag].extents.size()) return;
  Tag& t = q.tags[tag];
  Extent& e = t.extents[index];
  if (res < 0) {
    if (!t.error) t.error = -res;
  } else if (e.kind != kZero) {
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
  if (--t.pending == 0) ExtentsFinished(q, tag);
}

void Device::ExtentsFinished(Queue& q, uint16_t tag) {
  Tag& t = q.tags[tag];
  if (t.needsEngine) {
    t.state = TagState::kWaiting;
    q.ordered.push_back(tag);
    q.ordered.push_back(t.error);
    return;
  }
  q.done.push_back(tag);
  q.done.push_back(t.error);
  Commit(q, tag, t.error ? -t.error : int32_t(t.bytes));
}

// close() returns the completions not yet delivered, as (queue, tag, errno) triples: those
// requests are finished in the kernel, and the engine must hear how they ended.
Napi::Value Device::Close(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  size_t n = 0;
  for (auto& q : queues_) n += q->done.size() / 2 * 3;
  Napi::Int32Array pending = Napi::Int32Array::New(env, n);
  size_t k = 0;
  for (auto& q : queues_) {
    for (size_t i = 0; i + 1 < q->done.size(); i += 2) {
      pending[k++] = q->id;
      pending[k++] = q->done[i];
      pending[k++] = q->done[i + 1];
    }
    q->done.clear();
  }
  Shutdown();
  return pending;
}

void Device::Shutdown() {
  CloseHandle(deliverTimer_);
  for (auto& q : queues_) {
    if (!q->ring.open()) continue;
    // Backing reads land in the tag buffers or the requests' pages: let them finish before the
    // buffers are unmapped and the ring, which holds the requests' registrations, goes.
    // File I/O always completes, so this wait is bounded.
    while (q->backingInFlight > 0) {
      io_uring_cqe* cqe;
      if (io_uring_wait_cqe(q->ring.get(), &cqe) < 0) break;
      if (cqe->user_data & kExtentBit) q->backingInFlight--;
      io_uring_cqe_seen(q->ring.get(), cqe);
    }
    // Closing the ring cancels the outstanding FETCHes: the kernel sees the server go away.
    q->ring.Close();
  }
  queues_.clear();  // unmaps descriptors and buffers
  charFd_.Reset();
  onEvents_.Reset();
  eventsRef_.Reset();
  events_ = nullptr;
}

// inspect(queue): where each tag is and what the queue holds for JS, for the daemon's report of
// a request outstanding far too long. Cheap, but only called when one is.
Napi::Value Device::Inspect(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Queue& q = QueueArg(env, info[0]);
  Napi::Uint8Array states = Napi::Uint8Array::New(env, depth_);
  for (uint32_t tag = 0; tag < depth_; tag++) states[tag] = uint8_t(q.tags[tag].state);
  Napi::Object out = Napi::Object::New(env);
  out.Set("states", states);
  out.Set("requests", double(q.requests.size() / kRequestFields));
  out.Set("ordered", double(q.ordered.size() / 2));
  out.Set("done", double(q.done.size() / 2));
  out.Set("backingInFlight", double(q.backingInFlight));
  out.Set("deliveryArmed", deliverTimer_ != nullptr && uv_is_active(reinterpret_cast<uv_handle_t*>(deliverTimer_)) != 0);
  return out;
}

Napi::Value Device::LastError(const Napi::CallbackInfo& info) {
  if (lastError_.empty()) return info.Env().Null();
  return Napi::String::New(info.Env(), lastError_);
}

}  // namespace cldd
