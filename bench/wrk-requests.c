/*
 * bench/wrk-requests.c: an LD_PRELOAD library that records every request wrk makes, as wrk
 * times it, before wrk's own correction of its latency figures. Built and used by
 * bench/wrk-stalls.sh:
 *
 *     cc -O2 -shared -fPIC -o wrk-requests.so bench/wrk-requests.c -ldl
 *     WRK_REQUESTS_OUT=requests.txt LD_PRELOAD=./wrk-requests.so wrk -t1 -c64 ...
 *
 * Why: wrk corrects its latency histogram for coordinated omission before it prints it
 * (stats_correct in wg/wrk's wrk.c): for each request that took L >= 2*I, where I is the mean
 * time between two requests on one connection, it adds synthetic samples at L-I, L-2I, ...
 * down to I. So wrk's p99 weighs a stall of S ms on 64 connections as 64*S/I requests, and a
 * load generator that records every request (bench/timeline.rs) sees another figure. This
 * library gives wrk's own requests, uncorrected.
 *
 * wrk writes each request with one write(2) per connection (keep-alive, no pipelining) and
 * reads the answer with read(2). A request is taken to start at the write and to end at the
 * last read on that fd before the next write: one line per request, written at exit:
 *
 *     start_ns latency_ns fd
 *
 * start_ns is CLOCK_REALTIME (as baton's log timestamps). The last request of each connection
 * is not recorded (no write follows it).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#define MAX_FD 65536
/* Room for this many requests (WRK_REQUESTS_MAX): reserved at start, touched as used. */
#define DEFAULT_MAX 50000000L

struct request { uint64_t start, end; int fd; };

static struct request *requests;
static long max_requests, recorded;
/* Per fd, and each fd belongs to one wrk thread: no two threads touch the same slot. */
static uint64_t started[MAX_FD], last_read[MAX_FD];
static ssize_t (*real_write)(int, const void *, size_t);
static ssize_t (*real_read)(int, void *, size_t);

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

__attribute__((constructor)) static void init(void) {
    real_write = (ssize_t (*)(int, const void *, size_t))dlsym(RTLD_NEXT, "write");
    real_read = (ssize_t (*)(int, void *, size_t))dlsym(RTLD_NEXT, "read");
    const char *max = getenv("WRK_REQUESTS_MAX");
    max_requests = max ? atol(max) : DEFAULT_MAX;
    requests = calloc((size_t)max_requests, sizeof *requests);
    if (!requests) {
        fprintf(stderr, "wrk-requests: cannot reserve room for %ld requests: lower WRK_REQUESTS_MAX\n",
                max_requests);
        exit(1);
    }
}

ssize_t write(int fd, const void *buf, size_t n) {
    if (fd > 2 && fd < MAX_FD) {
        uint64_t t = now_ns();
        if (started[fd] && last_read[fd]) {
            /* wrk -t2 writes from two threads. */
            long i = __atomic_fetch_add(&recorded, 1, __ATOMIC_RELAXED);
            if (i < max_requests) {
                requests[i].start = started[fd];
                requests[i].end = last_read[fd];
                requests[i].fd = fd;
            }
        }
        started[fd] = t;
        last_read[fd] = 0;
    }
    return real_write(fd, buf, n);
}

ssize_t read(int fd, void *buf, size_t n) {
    ssize_t got = real_read(fd, buf, n);
    if (got > 0 && fd > 2 && fd < MAX_FD && started[fd]) last_read[fd] = now_ns();
    return got;
}

__attribute__((destructor)) static void report(void) {
    const char *path = getenv("WRK_REQUESTS_OUT");
    if (!path) return;
    FILE *out = fopen(path, "w");
    if (!out) {
        perror("wrk-requests: cannot write WRK_REQUESTS_OUT");
        return;
    }
    long n = recorded < max_requests ? recorded : max_requests;
    if (recorded > max_requests)
        fprintf(stderr, "wrk-requests: %ld requests not recorded: raise WRK_REQUESTS_MAX\n",
                recorded - max_requests);
    for (long i = 0; i < n; i++)
        fprintf(out, "%llu %llu %d\n", (unsigned long long)requests[i].start,
                (unsigned long long)(requests[i].end - requests[i].start), requests[i].fd);
    fclose(out);
}
