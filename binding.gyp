{
  "targets": [
    {
      "target_name": "cldd_native",
      "sources": [
        "native/addon.cc",
        "native/checksum.cc",
        "native/common.cc",
        "native/store.cc",
        "native/control.cc",
        "native/device.cc",
        "native/serving.cc",
        "native/redirector.cc",
        "native/system.cc",
      ],
      "dependencies": ["<!(node -p \"require('node-addon-api').targets\"):node_addon_api_except"],
      # Hidden visibility: the addon exports its init function only (Node finds nothing else),
      # and its own calls go direct instead of through the PLT.
      "cflags_cc": ["-std=c++20", "-Wall", "-Wextra", "-Wno-missing-field-initializers", "-fexceptions",
                    "-fvisibility=hidden", "-fvisibility-inlines-hidden"],
      "cflags_cc!": ["-fno-exceptions", "-std=gnu++17"],
      "defines": ["NAPI_VERSION=8"],
      # Debian's liburing-dev ships a static archive; linking it keeps the addon free of a
      # run-time dependency on the liburing2 package.
      "libraries": ["-Wl,-Bstatic", "-luring", "-Wl,-Bdynamic"],
    }
  ]
}
