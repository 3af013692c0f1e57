// The resync's copy without cldd, for `npm run bench` (scripts/bench/device.ts builds it): copies
// each run of a list from one file to another with a blocking read and a blocking write, then
// fdatasyncs the target, and prints {"seconds": ...} for all of it. No buffer reuse tricks, no
// threads: the least a program that copies only those runs does, to set the resync beside.
//   copy-runs SOURCE TARGET RUNS    (RUNS: one "from to length" line per run, in bytes)
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec / 1e9;
}

static void fail(const char* what, const char* path) {
  fprintf(stderr, "copy-runs: %s %s: %s\n", what, path, strerror(errno));
  exit(1);
}

// One run's read (write 0) or write (write 1) of `length` bytes at `offset`, in as many calls as
// it takes.
static void transfer(int fd, const char* path, char* buffer, unsigned long long length, unsigned long long offset, int write) {
  for (unsigned long long done = 0; done < length;) {
    ssize_t n = write ? pwrite(fd, buffer + done, length - done, (off_t)(offset + done))
                      : pread(fd, buffer + done, length - done, (off_t)(offset + done));
    if (n <= 0) {
      if (n == 0) errno = write ? EIO : ENODATA;
      fail(write ? "write" : "read", path);
    }
    done += (unsigned long long)n;
  }
}

int main(int argc, char** argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: copy-runs SOURCE TARGET RUNS\n");
    return 2;
  }
  FILE* list = fopen(argv[3], "r");
  if (!list) fail("open", argv[3]);
  size_t count = 0, room = 1 << 16;
  unsigned long long(*runs)[3] = malloc(room * sizeof *runs);
  if (!runs) fail("allocate the list of", argv[3]);
  unsigned long long from, to, length, most = 0;
  int fields;
  while ((fields = fscanf(list, "%llu %llu %llu", &from, &to, &length)) == 3) {
    if (count == room && !(runs = realloc(runs, (room *= 2) * sizeof *runs))) fail("grow the list of", argv[3]);
    runs[count][0] = from, runs[count][1] = to, runs[count][2] = length, count++;
    if (length > most) most = length;
  }
  if (fields != EOF || ferror(list)) {
    fprintf(stderr, "copy-runs: %s: run %zu is not \"from to length\"\n", argv[3], count + 1);
    return 1;
  }
  int source = open(argv[1], O_RDONLY | O_CLOEXEC);
  if (source < 0) fail("open", argv[1]);
  int target = open(argv[2], O_WRONLY | O_CLOEXEC);
  if (target < 0) fail("open", argv[2]);
  char* buffer = malloc(most ? most : 1);
  if (!buffer) fail("allocate a buffer for", argv[3]);
  double start = now();
  for (size_t i = 0; i < count; i++) {
    transfer(source, argv[1], buffer, runs[i][2], runs[i][0], 0);
    transfer(target, argv[2], buffer, runs[i][2], runs[i][1], 1);
  }
  if (fdatasync(target) < 0) fail("fdatasync", argv[2]);
  printf("{\"seconds\":%.6f}\n", now() - start);
  return 0;
}
