// CRC-32C (Castagnoli) for the on-disk format's checksums (src/format/crc32c.ts).
#pragma once
#include "common.h"

namespace cldd {
// The CRC of data[0, n), continuing from `seed` (the CRC of what came before), as crc32c() in JS.
uint32_t Crc32c(const uint8_t* data, size_t n, uint32_t seed = 0);
// Adds crc32c(data, start, end, seed) to the exports.
void DefineChecksum(Napi::Env env, Napi::Object exports);
}  // namespace cldd
