// The ublk UAPI as this addon uses it. The build host's <linux/ublk_cmd.h> may be the 6.1 one,
// so everything newer is defined here, guarded, with the kernel's values.
#pragma once

#include <linux/ioctl.h>
#include <linux/ublk_cmd.h>

#include <cstdint>

#ifndef UBLK_F_CMD_IOCTL_ENCODE
#define UBLK_F_CMD_IOCTL_ENCODE (1ULL << 6)
#endif

namespace cldd {

// ublksrv_io_cmd: 16 bytes, carried in the command area of a 64-byte SQE.
struct IoCmd {
  uint16_t q_id;
  uint16_t tag;
  int32_t result;
  uint64_t addr;
};
static_assert(sizeof(IoCmd) == 16);

struct IoDesc {
  uint32_t op_flags;
  uint32_t nr_sectors;
  uint64_t start_sector;
  uint64_t addr;
};
static_assert(sizeof(IoDesc) == 24);

// ublksrv_ctrl_cmd: 32 bytes, carried in the command area of a 128-byte SQE.
struct CtrlCmd {
  uint32_t dev_id;
  uint16_t queue_id;
  uint16_t len;
  uint64_t addr;
  uint64_t data0;
  uint16_t dev_path_len;
  uint16_t pad;
  uint32_t reserved;
};
static_assert(sizeof(CtrlCmd) == 32);

// The legacy I/O opcodes and their ioctl encodings (_IOWR('u', nr, struct ublksrv_io_cmd)).
constexpr uint32_t kIoFetch = 0x20;
constexpr uint32_t kIoCommitAndFetch = 0x21;
constexpr uint32_t EncodeIo(uint32_t nr) { return _IOWR('u', nr, IoCmd); }

// UBLK_F_USER_COPY: a request's data is at this position of /dev/ublkcN, per queue and tag.
constexpr uint64_t kUserCopyBase = 0x80000000ULL;
constexpr unsigned kUserCopyTagShift = 25;
constexpr unsigned kUserCopyQueueShift = 25 + 16;

// The descriptor array of every queue starts at a stride computed from the largest depth, not
// the configured one.
constexpr size_t kMaxDepth = 4096;

}  // namespace cldd
