#include "store.h"

#include "wire.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>

namespace cldd {

namespace {
const char* const kKindName[] = {"read", "write", "zero", "flush"};
// io_uring read/write lengths are 32-bit; larger requests go in pieces.
constexpr uint64_t kMaxChunk = 1u << 30;
// A merge punches the data area under a hole in the change area at least this long, and copies
// a shorter one as the zeros it reads as. Punching costs about the same at any length, writing
// grows with it: on ext4 over a written file (6.12 TCG VM, brd) 4 KiB, 64 KiB, 256 KiB and 1 MiB
// punches took 218, 219, 495 and 991 us each, writing the zeros and their share of the
// fdatasync 43, 275, 930 and 3,370 us; on the host's ext4 (mounted with discard) 4 KiB punches
// took 242 us against 83. A resync of 16,334 scattered 4 KiB runs, 1,086 of them holes, took
// 1.2-1.5 s with every hole punched against 0.58-0.60 s copying them.
constexpr uint64_t kPunchMinBytes = 256u << 10;
}  // namespace

// One JS call (one promise); it may have several parts in flight.
struct Store::Job {
  Napi::Promise::Deferred deferred;
  Napi::Reference<Napi::Value> keep;  // the caller's buffer stays alive while the kernel uses it
  std::string what;
  size_t pending = 1;  // one for the launch itself, so no part can settle the job early
  int error = 0;
  std::string failed;
  explicit Job(Napi::Env env) : deferred(Napi::Promise::Deferred::New(env)) {}
};

struct Store::Part {
  Job* job;
  uint8_t kind;
  uint8_t* data;
  uint64_t offset;
  uint64_t length;
  uint64_t done = 0;
};

Napi::Function Store::Define(Napi::Env env) {
  return DefineClass(env, "Store",
                     {
                         InstanceAccessor<&Store::Size>("size"),
                         InstanceAccessor<&Store::IsBlockDevice>("isBlockDevice"),
                         InstanceAccessor<&Store::FdValue>("fd"),
                         InstanceMethod<&Store::Read>("read"),
                         InstanceMethod<&Store::Write>("write"),
                         InstanceMethod<&Store::Zero>("zero"),
                         InstanceMethod<&Store::Flush>("flush"),
                         InstanceMethod<&Store::Run>("run"),
                         InstanceMethod<&Store::Sequence>("sequence"),
                         InstanceMethod<&Store::Copy>("copy"),
                         InstanceMethod<&Store::PunchesHoles>("punchesHoles"),
                         InstanceMethod<&Store::Close>("close"),
                     });
}

// new Store(path, readOnly, lock)
Store::Store(const Napi::CallbackInfo& info) : Napi::ObjectWrap<Store>(info) {
  Napi::Env env = info.Env();
  path_ = info[0].As<Napi::String>().Utf8Value();
  bool readOnly = info[1].ToBoolean();
  bool lock = info[2].ToBoolean();
  struct stat st;
  if (::stat(path_.c_str(), &st) < 0) throw ErrnoError(env, errno, "open " + path_);
  blockDevice_ = S_ISBLK(st.st_mode);
  if (!blockDevice_ && !S_ISREG(st.st_mode)) {
    throw CodeError(env, "EINVAL", path_ + " is neither a regular file nor a block device");
  }
  int flags = (readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC;
  // A block device held by a mount or another program is refused rather than written under it.
  if (blockDevice_ && !readOnly) flags |= O_EXCL;
  fd_.Reset(::open(path_.c_str(), flags));
  if (!fd_.valid()) {
    int err = errno;
    if (err == EBUSY) throw CodeError(env, "EBUSY", path_ + " is busy (mounted, attached or open by another program)");
    throw ErrnoError(env, err, "open " + path_);
  }
  // Two servers on one backing file would corrupt it; the lock dies with its process, so a
  // restart after a crash is not refused.
  if (lock && ::flock(fd_.get(), LOCK_EX | LOCK_NB) < 0) {
    int err = errno;
    if (err == EWOULDBLOCK) throw CodeError(env, "EBUSY", path_ + " is already attached by another cldd process");
    throw ErrnoError(env, err, "lock " + path_);
  }
  if (blockDevice_) {
    uint64_t bytes = 0;
    if (::ioctl(fd_.get(), BLKGETSIZE64, &bytes) < 0) throw ErrnoError(env, errno, "size of " + path_);
    size_ = bytes;
  } else {
    size_ = static_cast<uint64_t>(st.st_size);
  }
  ring_.Init(env, 64, 0, "store " + path_);
  context_ = std::make_unique<Napi::AsyncContext>(env, "cldd:store");
  ring_.Watch([this] { OnCompletions(); });
  cleanup_.Add(env, [](void* self) { static_cast<Store*>(self)->Shutdown(); }, this);
}

Store::~Store() { Shutdown(); }

void Store::Shutdown() {
  // Finalization or environment teardown: nothing can wait any more, so in-flight requests
  // are abandoned with the ring (the kernel finishes or cancels them).
  ring_.Close();
  fd_.Reset();
  closed_ = true;
}

Napi::Value Store::Size(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), double(size_)); }
Napi::Value Store::IsBlockDevice(const Napi::CallbackInfo& info) { return Napi::Boolean::New(info.Env(), blockDevice_); }

// punchesHoles(): whether the file's file system punches holes, asked with a punch of a block
// past the end of the file (KEEP_SIZE: nothing the file holds changes). vfat, exFAT and NFSv3
// refuse it (EOPNOTSUPP). Not for a block device: a punch past its end is EINVAL whatever it can
// do, and one inside it would change data (src/system/system.ts asks sysfs instead).
Napi::Value Store::PunchesHoles(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  CheckOpen(env, "punchesHoles");
  if (blockDevice_) throw CodeError(env, "EINVAL", "punchesHoles on " + path_ + ": a block device is asked through sysfs");
  struct stat st;
  if (::fstat(fd_.get(), &st) < 0) throw ErrnoError(env, errno, "size of " + path_);
  off_t past = (st.st_size + 4095) / 4096 * 4096;
  int rc;
  do rc = ::fallocate(fd_.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, past, 4096);
  while (rc < 0 && errno == EINTR);
  if (rc == 0) return Napi::Boolean::New(env, true);
  if (errno == EOPNOTSUPP || errno == ENOSYS) return Napi::Boolean::New(env, false);
  throw ErrnoError(env, errno, "punch past the end of " + path_);
}
Napi::Value Store::FdValue(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), fd_.get()); }

void Store::CheckOpen(Napi::Env env, const char* op) {
  if (closed_) throw CodeError(env, "CLDD_CLOSED", std::string(op) + " " + path_ + ": the store is closed");
}

Store::Job* Store::NewJob(Napi::Env env, Napi::Value keep, std::string what) {
  auto* job = new Job(env);
  jobs_++;
  ring_.SetRef(true);
  if (!keep.IsUndefined()) job->keep = Napi::Persistent(keep);
  job->what = std::move(what);
  return job;
}

void Store::AddPart(Job* job, uint8_t kind, uint8_t* data, uint64_t offset, uint64_t length) {
  auto* part = new Part{job, kind, data, offset, length};
  job->pending++;
  if (!Queue(part)) PartDone(part, EAGAIN);
}

bool Store::Queue(Part* part) {
  io_uring_sqe* sqe = ring_.Sqe();
  if (!sqe) return false;
  uint64_t left = part->length - part->done;
  switch (part->kind) {
    case kRead:
      io_uring_prep_read(sqe, fd_.get(), part->data + part->done, unsigned(std::min(left, kMaxChunk)),
                         part->offset + part->done);
      break;
    case kWrite:
      io_uring_prep_write(sqe, fd_.get(), part->data + part->done, unsigned(std::min(left, kMaxChunk)),
                          part->offset + part->done);
      break;
    case kZero:
      // Reads back zeros and gives the space back to the file system (or the device).
      io_uring_prep_fallocate(sqe, fd_.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, part->offset, part->length);
      break;
    case kSync:
      io_uring_prep_fsync(sqe, fd_.get(), IORING_FSYNC_DATASYNC);
      break;
  }
  io_uring_sqe_set_data(sqe, part);
  return true;
}

Napi::Value Store::Launch(Napi::Env env, Job* job) {
  Napi::Promise promise = job->deferred.Promise();
  if (job->pending > 1) ring_.Submit();
  Release(job);
  return promise;
}

static uint8_t* BufferData(const Napi::Value& value, size_t* length) {
  Napi::TypedArray array = value.As<Napi::TypedArray>();
  *length = array.ByteLength();
  return static_cast<uint8_t*>(array.ArrayBuffer().Data()) + array.ByteOffset();
}

Napi::Value Store::Read(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  CheckOpen(env, "read");
  size_t length;
  uint8_t* data = BufferData(info[0], &length);
  uint64_t offset = uint64_t(info[1].As<Napi::Number>().Int64Value());
  Job* job = NewJob(env, info[0], "read " + path_ + " at " + std::to_string(offset));
  if (length) AddPart(job, kRead, data, offset, length);
  return Launch(env, job);
}

Napi::Value Store::Write(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  CheckOpen(env, "write");
  size_t length;
  uint8_t* data = BufferData(info[0], &length);
  uint64_t offset = uint64_t(info[1].As<Napi::Number>().Int64Value());
  Job* job = NewJob(env, info[0], "write " + path_ + " at " + std::to_string(offset));
  if (length) AddPart(job, kWrite, data, offset, length);
  return Launch(env, job);
}

Napi::Value Store::Zero(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  CheckOpen(env, "zero");
  uint64_t offset = uint64_t(info[0].As<Napi::Number>().Int64Value());
  uint64_t length = uint64_t(info[1].As<Napi::Number>().Int64Value());
  Job* job = NewJob(env, env.Undefined(), "zero " + path_ + " at " + std::to_string(offset));
  if (length) AddPart(job, kZero, nullptr, offset, length);
  return Launch(env, job);
}

Napi::Value Store::Flush(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  CheckOpen(env, "flush");
  Job* job = NewJob(env, env.Undefined(), "flush " + path_);
  AddPart(job, kSync, nullptr, 0, 0);
  return Launch(env, job);
}

// The (kind, offset, length, bufferOffset) records of run() and sequence(), over one buffer.
struct Store::Record {
  uint8_t kind;
  uint8_t* data;  // null for a zero or a flush
  uint64_t offset;
  uint64_t length;
};

// Part of a copy run's source: `length` bytes from `at` (in the run) that are data or a hole.
struct Store::Span {
  uint64_t at;
  uint64_t length;
  bool hole;
};

// One run of a merge's copy: `length` bytes from `from` (change area) through `data` to `to`.
struct Store::CopyRun {
  uint8_t* data;
  uint64_t from;
  uint64_t to;
  uint64_t length;
  std::vector<Span> spans;  // empty: all data
};

// Reads info[0]'s records over info[1]'s buffer, all checked by `fits(kind, length, bufferOffset,
// bufferLength)` before any runs; the first that does not fit is EINVAL naming it.
std::vector<Store::Record> Store::ReadRecords(const Napi::CallbackInfo& info, const char* op,
                                              bool (*fits)(double, double, double, double)) {
  Napi::Env env = info.Env();
  CheckOpen(env, op);
  Napi::Float64Array ops = info[0].As<Napi::Float64Array>();
  size_t length;
  uint8_t* data = BufferData(info[1], &length);
  size_t count = ops.ElementLength() / 4;
  std::vector<Record> records;
  records.reserve(count);
  for (size_t i = 0; i < count; i++) {
    double kind = ops[4 * i], len = ops[4 * i + 2], at = ops[4 * i + 3];
    if (!fits(kind, len, at, double(length))) {
      throw CodeError(env, "EINVAL", std::string(op) + " on " + path_ + ": record " + std::to_string(i) + " does not fit the buffer");
    }
    bool bytes = kind == double(kRead) || kind == double(kWrite);
    records.push_back({uint8_t(kind), bytes ? data + uint64_t(at) : nullptr, uint64_t(ops[4 * i + 1]), uint64_t(len)});
  }
  return records;
}

// run(ops, buffer): kind 0 read, 1 write, 2 zero; all of them run concurrently and one promise
// settles for the lot.
Napi::Value Store::Run(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto records = ReadRecords(info, "run", [](double kind, double len, double at, double length) {
    return kind >= 0 && kind <= double(kZero) && (kind == double(kZero) || at + len <= length);
  });
  Job* job = NewJob(env, info[1], "run on " + path_);
  for (const Record& r : records) {
    if (r.length) AddPart(job, r.kind, r.data, r.offset, r.length);
  }
  return Launch(env, job);
}

// A commit's writes and flushes, or a merge's reads and writes, each started after the one before
// it completed, with blocking calls on a thread of libuv's pool: one hand-off and one completion
// for the lot. Through the ring each step was a round trip of its own (ext4 hands buffered writes
// and every fdatasync to an io_uring worker) and a pass through the event loop: 0.7-1.3 ms per
// step in the 6.12 TCG VM, five steps for a first touch's flush. A merge's window of about 200
// short runs: its reads are served from the page cache inside the submitting call, but each write
// goes to a worker that runs one file's writes one at a time; here the copy of about 26,000 runs
// took 1.20-1.25 s against 1.46-1.95 s through the ring (7.3 TCG VM, docs/benchmarks.md).
class Store::SequenceWorker : public Napi::AsyncWorker {
 public:
  using Step = Record;

  SequenceWorker(Napi::Env env, Store* store, Job* job, int fd, std::vector<Step> steps, std::vector<CopyRun> runs,
                 Bounce bounce)
      : Napi::AsyncWorker(env, "cldd:store-sequence"),
        store_(store),
        self_(Napi::Persistent(store->Value())),
        job_(job),
        fd_(fd),
        steps_(std::move(steps)),
        runs_(std::move(runs)),
        bounce_(bounce) {}

  void Execute() override {
    if (!runs_.empty()) return ExecuteCopy();
    for (const Step& step : steps_) {
      if (step.kind == kSync) {
        int rc;
        do rc = ::fdatasync(fd_.get());
        while (rc < 0 && errno == EINTR);
        if (rc < 0) {
          Fail(step.kind, step.offset, step.length, errno, 0);
          return;
        }
        continue;
      }
      if (!Transfer(step.kind, step.data, step.offset, step.length)) return;
    }
  }

  void OnOK() override {
    if (err_ && !job_->error) {
      job_->error = err_;
      job_->failed = failed_;
    }
    Store* store = store_;
    store->Release(job_);
    store->FinishClose();
  }

 private:
  // A merge's copy: in the kernel where the file system can (CopyInKernel) and no run reads what
  // another writes, else through the buffer: every run read, then written, where the buffer holds
  // them all; a buffer-full at a time where it does not (CopyThroughBounce). Where the change
  // area is a long hole (the master's blocks were discarded in the snapshot, and the engine
  // punched them there), the data area is punched rather than written with the zeros a read of
  // the hole gives: the same bytes, and the space a discard gave back is not taken again by the
  // resync.
  void ExecuteCopy() {
    for (CopyRun& run : runs_) FindHoles(run);
    bool disjoint = Disjoint();
    if (bounce_.data && !disjoint) {
      // Copied a buffer-full at a time, a later run would read what an earlier one wrote.
      err_ = EINVAL;
      failed_ = "a run reads what another writes, and the runs do not fit the " + std::to_string(bounce_.length) + "-byte buffer";
      return;
    }
    bool inFile = store_->blockDevice_ || SourcesInFile();
    if (store_->copiesInKernel_.load(std::memory_order_relaxed) && !store_->blockDevice_ && disjoint && inFile) {
      if (CopyInKernel() != kUnsupported) return;
      store_->copiesInKernel_.store(false, std::memory_order_relaxed);
    }
    if (bounce_.data) return CopyThroughBounce(inFile);
    for (CopyRun& run : runs_) {
      bool ok = ForEachSpan(run, [&](uint64_t at, uint64_t length, bool hole) {
        if (!hole) return Transfer(kRead, run.data + at, run.from + at, length);
        std::fill_n(run.data + at, length, uint8_t(0));
        return true;
      });
      if (!ok) return;
    }
    for (const CopyRun& run : runs_) {
      bool ok = ForEachSpan(run, [&](uint64_t at, uint64_t length, bool hole) {
        // A punch refused (no support, or ENOSPC: splitting an extent can need a block on a
        // full file system) leaves writing the zeros, which the buffer holds, as before.
        if (hole && Punch(run.to + at, length)) return true;
        return Transfer(kWrite, run.data + at, run.to + at, length);
      });
      if (!ok) return;
    }
  }

  // The copy of runs that do not fit the buffer, none reading what another writes: pieces of
  // them read into the buffer until it is full, then written, and again. As many reads and
  // writes as one pass, and the window a merge copies is not bounded by the buffer, so the
  // resync's memory is not bounded by its windows. A run whose source ends past the end of the
  // file (one that shrank under the store) fails the copy before anything is written, as the
  // one pass does.
  void CopyThroughBounce(bool inFile) {
    if (!inFile) {
      struct stat st;
      uint64_t size = ::fstat(fd_.get(), &st) == 0 ? uint64_t(st.st_size) : 0;
      for (const CopyRun& run : runs_) {
        if (run.from + run.length > size) {
          Fail(kRead, run.from, run.length, ENODATA, size > run.from ? size - run.from : 0);
          return;
        }
      }
    }
    struct Piece {
      uint64_t from, to, length;
      uint8_t* data;
      bool hole;
    };
    std::vector<Piece> batch;
    uint64_t fill = 0;
    auto flush = [&] {
      for (const Piece& p : batch) {
        if (p.hole) std::fill_n(p.data, p.length, uint8_t(0));
        else if (!Transfer(kRead, p.data, p.from, p.length)) return false;
      }
      for (const Piece& p : batch) {
        if (p.hole && Punch(p.to, p.length)) continue;
        if (!Transfer(kWrite, p.data, p.to, p.length)) return false;
      }
      batch.clear();
      fill = 0;
      return true;
    };
    for (const CopyRun& run : runs_) {
      bool ok = ForEachSpan(run, [&](uint64_t at, uint64_t length, bool hole) {
        for (uint64_t done = 0; done < length;) {
          if (fill == bounce_.length && !flush()) return false;
          uint64_t n = std::min(length - done, bounce_.length - fill);
          batch.push_back({run.from + at + done, run.to + at + done, n, bounce_.data + fill, hole});
          fill += n;
          done += n;
        }
        return true;
      });
      if (!ok) return;
    }
    flush();
  }

  enum CopyResult { kCopied, kFailed, kUnsupported };

  // The same copy without the buffer: each data span in one copy_file_range, which moves the
  // bytes from page cache to page cache inside the kernel (one copy where a read and a write
  // make two, and one call per run). A file system that cannot (no support, another kernel's
  // rules) refuses the first call, before a byte moved; anything copied before a later refusal
  // is copied again the other way, which gives the same bytes.
  CopyResult CopyInKernel() {
    for (const CopyRun& run : runs_) {
      CopyResult result = kCopied;
      ForEachSpan(run, [&](uint64_t at, uint64_t length, bool hole) {
        if (hole && Punch(run.to + at, length)) return true;
        result = CopyRange(run.from + at, run.to + at, length);
        return result == kCopied;
      });
      if (result != kCopied) return result;
    }
    return kCopied;
  }

  // Whether no run reads what another writes, as a merge's never do (change area to data area):
  // only then may a run be written before the next is read.
  bool Disjoint() const {
    std::vector<std::pair<uint64_t, uint64_t>> from, to;
    from.reserve(runs_.size());
    to.reserve(runs_.size());
    for (const CopyRun& run : runs_) {
      from.emplace_back(run.from, run.from + run.length);
      to.emplace_back(run.to, run.to + run.length);
    }
    std::sort(from.begin(), from.end());
    std::sort(to.begin(), to.end());
    for (size_t i = 0, j = 0; i < from.size() && j < to.size();) {
      if (from[i].second <= to[j].first) i++;
      else if (to[j].second <= from[i].first) j++;
      else return false;
    }
    return true;
  }

  // Whether every run's source is inside the file: one that is not (a file that shrank under the
  // store) must fail before anything is written, which the read-then-write path does.
  bool SourcesInFile() const {
    struct stat st;
    if (::fstat(fd_.get(), &st) != 0) return false;
    for (const CopyRun& run : runs_) {
      if (run.from + run.length > uint64_t(st.st_size)) return false;
    }
    return true;
  }

  CopyResult CopyRange(uint64_t from, uint64_t to, uint64_t length) {
    loff_t in = loff_t(from), out = loff_t(to);
    uint64_t done = 0;
    while (done < length) {
      ssize_t n = ::copy_file_range(fd_.get(), &in, fd_.get(), &out, size_t(std::min(length - done, kMaxChunk)), 0);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EINVAL || errno == EXDEV || errno == EOPNOTSUPP || errno == ENOSYS)) return kUnsupported;
      if (n <= 0) {
        // n == 0: the source ends before the run does (a file that shrank under the store).
        Fail(n < 0 ? kWrite : kRead, n < 0 ? to : from, length, n < 0 ? errno : ENODATA, done);
        return kFailed;
      }
      done += uint64_t(n);
    }
    return kCopied;
  }

  // Splits `run` into the spans of its source that are data and those that are holes of at
  // least kPunchMinBytes, as the file system reports them (SEEK_HOLE, SEEK_DATA); a shorter run
  // is not asked about, and a run with no such hole keeps no spans. Only what is reported as a
  // hole is treated as one: where lseek fails or cannot tell, the span is copied, which is never
  // wrong. A block device reports no holes.
  void FindHoles(CopyRun& run) {
    if (run.length < kPunchMinBytes) return;
    off_t end = off_t(run.from + run.length);
    off_t pos = off_t(run.from);
    off_t hole = ::lseek(fd_.get(), pos, SEEK_HOLE);
    if (hole < 0 || hole >= end) return;
    while (pos < end) {
      if (hole < 0 || hole > end) hole = end;
      AddSpan(run, pos, hole, false);
      if (hole >= end) break;
      off_t data = ::lseek(fd_.get(), hole, SEEK_DATA);
      // ENXIO: no data from `hole` to the end of the file. Past the end is no hole: it is read,
      // and the read fails as before (a file that shrank under the store).
      if (data < 0 && errno == ENXIO) {
        struct stat st;
        if (::fstat(fd_.get(), &st) == 0 && st.st_size > hole) data = std::min(off_t(st.st_size), end);
      }
      if (data < 0) {
        AddSpan(run, hole, end, false);
        break;
      }
      if (data > end) data = end;
      AddSpan(run, hole, data, true);
      pos = data;
      if (pos < end) hole = ::lseek(fd_.get(), pos, SEEK_HOLE);
    }
    if (run.spans.size() == 1 && !run.spans[0].hole) run.spans.clear();
  }

  // Adds [from, to) of the file to `run`'s spans, a short hole as data, joined to the span
  // before it when that is of the same kind.
  static void AddSpan(CopyRun& run, off_t from, off_t to, bool hole) {
    if (to <= from) return;
    uint64_t at = uint64_t(from) - run.from, length = uint64_t(to - from);
    if (length < kPunchMinBytes) hole = false;
    if (!run.spans.empty() && run.spans.back().hole == hole) {
      run.spans.back().length += length;
      return;
    }
    run.spans.push_back({at, length, hole});
  }

  template <typename F>
  static bool ForEachSpan(const CopyRun& run, F&& f) {
    if (run.spans.empty()) return f(0, run.length, false);
    for (const Span& span : run.spans) {
      if (!f(span.at, span.length, span.hole)) return false;
    }
    return true;
  }

  bool Punch(uint64_t offset, uint64_t length) {
    int rc;
    do rc = ::fallocate(fd_.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off_t(offset), off_t(length));
    while (rc < 0 && errno == EINTR);
    return rc == 0;
  }

  // Reads or writes all of `length` bytes; false (the worker failed) otherwise.
  bool Transfer(uint8_t kind, uint8_t* data, uint64_t offset, uint64_t length) {
    uint64_t done = 0;
    while (done < length) {
      size_t chunk = size_t(std::min(length - done, kMaxChunk));
      ssize_t n = kind == kRead ? ::pread(fd_.get(), data + done, chunk, off_t(offset + done))
                                : ::pwrite(fd_.get(), data + done, chunk, off_t(offset + done));
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return Fail(kind, offset, length, errno, done);
      // A read past the end of the file, or a write that made no progress.
      if (n == 0) return Fail(kind, offset, length, kind == kRead ? ENODATA : EIO, done);
      done += uint64_t(n);
    }
    return true;
  }

  bool Fail(uint8_t kind, uint64_t offset, uint64_t length, int err, uint64_t done) {
    err_ = err;
    failed_ = std::string(kKindName[kind]) + " of " + std::to_string(length) + " bytes at " + std::to_string(offset + done);
    return false;
  }

  Store* store_;
  Napi::ObjectReference self_;  // the store outlives the steps
  Job* job_;
  Fd fd_;  // a duplicate: the store's own fd may be closed at teardown while this runs
  std::vector<Step> steps_;
  std::vector<CopyRun> runs_;
  Bounce bounce_;  // data null: each run has its place in the buffer (CopyRun::data)
  int err_ = 0;
  std::string failed_;
};

// sequence(ops, buffer): kind 0 read, 1 write or 3 flush, run in order; the first error settles
// the promise and skips the rest.
Napi::Value Store::Sequence(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto steps = ReadRecords(info, "sequence", [](double kind, double len, double at, double length) {
    return kind == double(kSync) || ((kind == double(kRead) || kind == double(kWrite)) && at + len <= length);
  });
  return QueueSequence(env, info[1], "sequence", std::move(steps), {}, Bounce{});
}

// copy(runs, buffer): a merge window's runs, (from, to, length, bufferOffset) each: every run's
// read from `from` into the buffer at its offset, then every run's write of it to `to` (or a
// punch, where `from` is a long hole: SequenceWorker::ExecuteCopy). Where the runs' offsets go
// past the end of the buffer, it is a bounce buffer instead, and the runs must not read what
// another writes. Every run is checked against the store before the first read. Built here
// rather than as sequence() records in JS, with two range checks per run: with the word-level
// run scan, the main thread's CPU over a resync of 26,000 runs fell from 900-1100 ms to 740-860
// ms (7.3 TCG VM, docs/benchmarks.md).
Napi::Value Store::Copy(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  CheckOpen(env, "copy");
  Napi::Float64Array runs = info[0].As<Napi::Float64Array>();
  size_t bufferLength;
  uint8_t* data = BufferData(info[1], &bufferLength);
  if (runs.ElementLength() % 4 != 0) throw CodeError(env, "EINVAL", "copy on " + path_ + ": runs of four numbers are expected");
  size_t count = runs.ElementLength() / 4;
  // Offsets and lengths are whole numbers below 2^53 (exact in a double), so the sums are exact.
  auto whole = [](double x) { return x >= 0 && x <= 9007199254740991.0 && x == double(uint64_t(x)); };
  std::vector<CopyRun> copyRuns(count);
  double window = 0;
  for (size_t i = 0; i < count; i++) {
    double from = runs[4 * i], to = runs[4 * i + 1], len = runs[4 * i + 2], at = runs[4 * i + 3];
    if (!whole(from) || !whole(to) || !whole(len) || !whole(at) || from + len > double(size_) || to + len > double(size_)) {
      throw CodeError(env, "EINVAL", "copy on " + path_ + ": run " + std::to_string(i) + " is outside 0.." + std::to_string(size_));
    }
    window = std::max(window, at + len);
    copyRuns[i] = {data + uint64_t(at), uint64_t(from), uint64_t(to), uint64_t(len), {}};
  }
  Bounce bounce;
  if (window > double(bufferLength)) {
    if (bufferLength == 0) throw CodeError(env, "EINVAL", "copy on " + path_ + ": the buffer is empty");
    bounce = {data, bufferLength};
    for (CopyRun& run : copyRuns) run.data = nullptr;
  }
  return QueueSequence(env, info[1], "copy", {}, std::move(copyRuns), bounce);
}

Napi::Value Store::QueueSequence(Napi::Env env, Napi::Value keep, const char* op, std::vector<Record> steps,
                                 std::vector<CopyRun> runs, Bounce bounce) {
  int fd = ::fcntl(fd_.get(), F_DUPFD_CLOEXEC, 0);
  if (fd < 0) throw ErrnoError(env, errno, std::string(op) + " on " + path_ + ": dup");
  Job* job = NewJob(env, keep, std::string(op) + " on " + path_);
  job->pending++;  // the worker's
  Napi::Promise promise = job->deferred.Promise();
  (new SequenceWorker(env, this, job, fd, std::move(steps), std::move(runs), bounce))->Queue();
  Release(job);  // the launch's
  return promise;
}

Napi::Value Store::Close(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto deferred = Napi::Promise::Deferred::New(env);
  Napi::Promise promise = deferred.Promise();
  if (!ring_.open()) {
    closed_ = true;
    deferred.Resolve(env.Undefined());
  } else if (jobs_ == 0) {
    Shutdown();
    deferred.Resolve(env.Undefined());
  } else {
    // Requests in flight finish first; their buffers stay valid until then.
    closed_ = true;
    closeWaiters_.push_back(deferred);
  }
  return promise;
}

void Store::OnCompletions() {
  Napi::Env env = Env();
  RunFromLoop(env, *context_, [&] {
    io_uring_cqe* cqe;
    bool resubmit = false;
    while (ring_.open() && io_uring_peek_cqe(ring_.get(), &cqe) == 0) {
      auto* part = static_cast<Part*>(io_uring_cqe_get_data(cqe));
      int res = cqe->res;
      io_uring_cqe_seen(ring_.get(), cqe);
      if (res < 0) {
        PartDone(part, -res);
        continue;
      }
      if (part->kind == kRead || part->kind == kWrite) {
        if (res == 0) {
          // A read past the end of the file, or a write that made no progress.
          PartDone(part, part->kind == kRead ? ENODATA : EIO);
          continue;
        }
        part->done += uint64_t(res);
        if (part->done < part->length) {
          // Short transfer: go on where it stopped.
          if (Queue(part)) resubmit = true;
          else PartDone(part, EAGAIN);
          continue;
        }
      }
      PartDone(part, 0);
    }
    if (resubmit && ring_.open()) ring_.Submit();
    FinishClose();
  });
}

// A close waiting for the jobs in flight completes with the last of them.
void Store::FinishClose() {
  if (!closed_ || jobs_ != 0 || closeWaiters_.empty()) return;
  Shutdown();
  auto waiters = std::move(closeWaiters_);
  for (auto& w : waiters) w.Resolve(Env().Undefined());
}

void Store::PartDone(Part* part, int err) {
  Job* job = part->job;
  if (err && !job->error) {
    job->error = err;
    job->failed = std::string(kKindName[part->kind]) + " of " + std::to_string(part->length) + " bytes at " +
                  std::to_string(part->offset + part->done);
  }
  delete part;
  Release(job);
}

void Store::Release(Job* job) {
  if (--job->pending) return;
  Napi::Env env = Env();
  if (job->error == ENODATA) {
    job->deferred.Reject(CodeError(env, "EIO", job->what + ": " + job->failed + ": unexpected end of file").Value());
  } else if (job->error) {
    std::string what = job->what == job->failed ? job->what : job->what + " (" + job->failed + ")";
    job->deferred.Reject(ErrnoError(env, job->error, what).Value());
  } else {
    job->deferred.Resolve(env.Undefined());
  }
  delete job;
  if (--jobs_ == 0) ring_.SetRef(false);
}

}  // namespace cldd
