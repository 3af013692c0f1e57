// sd_notify, filesystem freeze/thaw, memory settings and a device's openers for the daemon.
#pragma once
#include "common.h"

namespace cldd {
// Adds notify, freeze, thaw, releasePages, disableHugePages, fixMmapThreshold and openersOf to
// the exports.
void DefineSystem(Napi::Env env, Napi::Object exports);
}  // namespace cldd
