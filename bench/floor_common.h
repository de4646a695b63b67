/*
 * What bench/send_floor.c and bench/ws_receivers.c share: exiting on an error, the clock their
 * stamps come from, whole reads and writes on pipes and sockets (a read waits at most
 * TIMEOUT_MS: every wait of a bench is bounded), a receiver's wait for its round's next
 * deliveries, and the comparison latencies are sorted by.
 * Include it after defining _GNU_SOURCE (for program_invocation_short_name).
 */
#ifndef FLOOR_COMMON_H
#define FLOOR_COMMON_H

#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
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

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

#endif
