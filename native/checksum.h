// CRC-32C (Castagnoli) for the on-disk format's checksums (src/format/crc32c.ts).
#pragma once
#include "common.h"

namespace cldd {
// Adds crc32c(data, start, end, seed) to the exports.
void DefineChecksum(Napi::Env env, Napi::Object exports);
}  // namespace cldd
