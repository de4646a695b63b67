/*
 * What bench/send_floor.c and bench/ws_receivers.c share: exiting on an error, the clock their
 * stamps come from, whole reads and writes on pipes and sockets (a read waits at most
 * TIMEOUT_MS: every wait of a bench is bounded), a receiver's wait for its round's next
 * deliveries, a receiver's sockets watched and its rounds read, and the comparison latencies
 * are sorted by.
 * Include it after defining _GNU_SOURCE (for program_invocation_short_name).
 */
#ifndef FLOOR_COMMON_H
#define FLOOR_COMMON_H

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <time.h>
#include <unistd.h>

#define TIMEOUT_MS 30000

static void die(const char *what) {
    perror(what);
    exit(1);
}

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static void write_all(int fd, const void *buf, size_t n) {
    const char *p = buf;
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) die("write");
        p += w;
        n -= (size_t)w;
    }
}

/* Reads exactly n bytes, or exits if nothing comes within TIMEOUT_MS. */
static void read_all(int fd, void *buf, size_t n) {
    char *p = buf;
    while (n > 0) {
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        if (poll(&pfd, 1, TIMEOUT_MS) <= 0) {
            fprintf(stderr, "%s: nothing to read for %d s\n", program_invocation_short_name,
                    TIMEOUT_MS / 1000);
            exit(1);
        }
        ssize_t r = read(fd, p, n);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) die("read");
        p += r;
        n -= (size_t)r;
    }
}

/* The next readiness events of a receiver's round, retried on EINTR; exits naming the round
 * and how far it got (`have` of `want` deliveries) when nothing comes within TIMEOUT_MS. */
static int wait_round(int ep, struct epoll_event *events, int max, int round, uint64_t have,
                      uint64_t want) {
    for (;;) {
        int k = epoll_wait(ep, events, max, TIMEOUT_MS);
        if (k > 0) return k;
        if (k < 0 && errno == EINTR) continue;
        if (k < 0) die("epoll_wait");
        fprintf(stderr, "%s: round %d: %llu of %llu deliveries after %d s\n",
                program_invocation_short_name, round, (unsigned long long)have,
                (unsigned long long)want, TIMEOUT_MS / 1000);
        exit(1);
    }
}

/* Receiver socket `s`, number `i` of its receiver: non-blocking and watched for input by `ep`. */
static void watch_socket(int ep, int s, int i) {
    fcntl(s, F_SETFL, O_NONBLOCK);
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, s, &ev) < 0) die("epoll_ctl");
}

/* Reads whatever receiver socket `i` has after a wake-up at `t`: the latency (us) of each
 * delivery it completes goes to `lat`; returns how many. */
typedef uint64_t (*take_fn)(void *ctx, int i, uint64_t t, uint32_t *lat);

/* A receiver's life once its `n` sockets are watched by `ep`: says ready on `rep`, then
 * `rounds` times reads (with `take`) until every socket has `messages` deliveries of the round
 * (got[i], when `take` counts per socket, is zeroed each round) and sends the round's
 * latencies on `rep`. */
static void receive_rounds(int ep, int n, int messages, int rounds, int rep, uint32_t *got,
                           uint32_t *lat, take_fn take, void *ctx) {
    char ok = 'r';
    write_all(rep, &ok, 1);
    struct epoll_event events[256];
    for (int r = 0; r < rounds; r++) {
        uint64_t want = (uint64_t)n * (uint64_t)messages, have = 0;
        if (got) memset(got, 0, sizeof(uint32_t) * (size_t)n);
        while (have < want) {
            int k = wait_round(ep, events, 256, r, have, want);
            uint64_t t = now_ns();
            for (int e = 0; e < k; e++) have += take(ctx, (int)events[e].data.u32, t, lat + have);
        }
        write_all(rep, lat, sizeof(uint32_t) * want);
    }
    exit(0);
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

#endif
