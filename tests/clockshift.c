/* An LD_PRELOAD shim that moves a process's wall clock by an offset read from a file.
 *
 * CLOCK_REALTIME (clock_gettime, gettimeofday, time) is shifted by the whole
 * number of seconds written in the file that CLOCKSHIFT_FILE names, re-read at
 * most every 20 ms, so a test can jump the clock of a running process by
 * rewriting the file. Monotonic clocks are left alone, as a real clock step
 * (an NTP correction, a resumed VM) leaves them.
 *
 * Build: gcc -shared -fPIC -O2 -o clockshift.so clockshift.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/time.h>
#include <time.h>

typedef int (*clock_gettime_fn)(clockid_t, struct timespec *);

static long long offset_seconds;
static long long next_read_ns;

static clock_gettime_fn real_clock_gettime(void) {
    static clock_gettime_fn real;
    if (!real) real = (clock_gettime_fn)dlsym(RTLD_NEXT, "clock_gettime");
    return real;
}

static long long current_offset(void) {
    struct timespec mono;
    real_clock_gettime()(CLOCK_MONOTONIC, &mono);
    long long now_ns = mono.tv_sec * 1000000000LL + mono.tv_nsec;
    if (now_ns >= __atomic_load_n(&next_read_ns, __ATOMIC_RELAXED)) {
        __atomic_store_n(&next_read_ns, now_ns + 20000000LL, __ATOMIC_RELAXED);
        const char *path = getenv("CLOCKSHIFT_FILE");
        FILE *file = path ? fopen(path, "r") : NULL;
        if (file) {
            long long value;
            if (fscanf(file, "%lld", &value) == 1)
                __atomic_store_n(&offset_seconds, value, __ATOMIC_RELAXED);
            fclose(file);
        }
    }
    return __atomic_load_n(&offset_seconds, __ATOMIC_RELAXED);
}

int clock_gettime(clockid_t clock, struct timespec *ts) {
    int result = real_clock_gettime()(clock, ts);
    if (result == 0 && (clock == CLOCK_REALTIME || clock == CLOCK_REALTIME_COARSE))
        ts->tv_sec += current_offset();
    return result;
}

int gettimeofday(struct timeval *restrict tv, void *restrict tz) {
    struct timespec ts;
    int result = clock_gettime(CLOCK_REALTIME, &ts);
    (void)tz;
    if (result == 0) {
        tv->tv_sec = ts.tv_sec;
        tv->tv_usec = ts.tv_nsec / 1000;
    }
    return result;
}

time_t time(time_t *out) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (out) *out = ts.tv_sec;
    return ts.tv_sec;
}
