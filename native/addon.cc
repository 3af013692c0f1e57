// The cldd native addon: the kernel-facing pieces only (io_uring, /dev/ublk-control, the ublk
// queues). Decisions live in TypeScript; see src/native/addon.ts for the one module that loads this.
#include "checksum.h"
#include "common.h"
#include "control.h"
#include "device.h"
#include "redirector.h"
#include "serving.h"
#include "store.h"
#include "system.h"

namespace {

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  exports.Set("Store", cldd::Store::Define(env));
  exports.Set("Control", cldd::Control::Define(env));
  exports.Set("Device", cldd::Device::Define(env));
  exports.Set("Redirector", cldd::Redirector::Define(env));
  cldd::DefineSystem(env, exports);
  cldd::DefineServing(env, exports);
  cldd::DefineChecksum(env, exports);
  return exports;
}

}  // namespace

NODE_API_MODULE(cldd_native, Init)
