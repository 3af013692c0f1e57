// sd_notify and filesystem freeze/thaw for the daemon.
#pragma once
#include "common.h"

namespace cldd {
// Adds notify(socket, message), freeze(mountpoint) and thaw(mountpoint) to the exports.
void DefineSystem(Napi::Env env, Napi::Object exports);
}  // namespace cldd
