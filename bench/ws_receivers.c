/*
 * The floor's receivers, against a real WebSocket server: C clients that join one room of the
 * relay protocol (docs/protocol.md) and then do what bench/send_floor.c's receivers do: read,
 * take the stamp, nothing else. With these on both sides, a broadcast's figure and the floor's
 * differ by the server alone (tunegate load's receivers parse each message's JSON and keep a
 * histogram, on the same two cores as the server).
 *
 *   ws_receivers PORT MEMBERS PROCESSES MESSAGES ROUNDS [SERVER_PID...]
 *
 * PROCESSES receiver processes each open MEMBERS / PROCESSES connections to 127.0.0.1:PORT from
 * their own source address (127.0.0.2 + i), upgrade, and join room "all", one at a time; one
 * more connection asks the room's count until it is MEMBERS (at most 30 s), then publishes.
 * ROUNDS times: the parent stamps CLOCK_MONOTONIC and publishes MESSAGES messages whose data is
 * {"t": STAMP}; each receiver reads until its connections have MESSAGES messages each of the
 * round and reports, per delivery, the microseconds from the stamp to its read. The parent prints one JSON object: per round p50/p99/max, over
 * all rounds the same, and with SERVER_PIDs the CPU those processes spent from the first
 * round's stamp to the last round's last delivery, per delivery (their /proc/PID/stat).
 *
 * Frames from the server are unmasked (RFC 6455 5.1); ours are masked with a zero key, which
 * leaves the payload as it is. Anything but a text frame (a ping: the caller sets heartbeats far
 * apart) is skipped. Bounded: every wait has a timeout (30 s); a stuck round fails the run.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "floor_common.h"

#define MAX_PROCESSES 64
#define BUF (1 << 16)

/* utime + stime of the processes in `pids`, in nanoseconds. */
static uint64_t cpu_of(char **pids, int n) {
    uint64_t ticks = 0;
    for (int i = 0; i < n; i++) {
        char path[64], line[1024];
        snprintf(path, sizeof path, "/proc/%s/stat", pids[i]);
        FILE *f = fopen(path, "r");
        if (!f) die(path);
        if (!fgets(line, sizeof line, f)) die(path);
        fclose(f);
        char *p = strrchr(line, ')');
        unsigned long long ut = 0, st = 0;
        /* After the comm: state is field 3, utime 14, stime 15. */
        if (!p || sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut, &st) != 2)
            die("parse /proc/PID/stat");
        ticks += ut + st;
    }
    return ticks * (1000000000u / (uint64_t)sysconf(_SC_CLK_TCK));
}

/* One masked text frame (zero key) carrying `text`. */
static void send_text(int s, const char *text) {
    unsigned char frame[256];
    size_t n = strlen(text);
    if (n > 125) die("frame too long");
    frame[0] = 0x81;
    frame[1] = 0x80 | (unsigned char)n;
    memset(frame + 2, 0, 4);
    memcpy(frame + 6, text, n);
    write_all(s, frame, n + 6);
}

/* The length of the frame at `p` (header and payload) once `have` bytes cover its header, and
 * where its payload starts; 0 while the header is incomplete. */
static size_t frame_len(const unsigned char *p, size_t have, size_t *payload_at) {
    if (have < 2) return 0;
    size_t len = p[1] & 0x7f, at = 2;
    if (len == 126) {
        if (have < 4) return 0;
        len = (size_t)p[2] << 8 | p[3];
        at = 4;
    } else if (len == 127) {
        die("frame over 64 KiB");
    }
    *payload_at = at;
    return at + len;
}

/* Reads one whole frame from a blocking socket into buf; returns its length. */
static size_t read_frame(int s, unsigned char *buf, size_t *payload_at) {
    size_t have = 2;
    read_all(s, buf, 2);
    if ((buf[1] & 0x7f) == 126) {
        read_all(s, buf + 2, 2);
        have = 4;
    }
    size_t len = frame_len(buf, have, payload_at);
    if (len > BUF) die("frame too big");
    read_all(s, buf + have, len - have);
    return len;
}

/* Connects from `source`, upgrades, reads the hello, joins "all" (if `join`) and reads the
 * reply. Returns the socket, blocking. */
static int open_ws(const char *source, int port, int join, unsigned char *buf) {
    struct sockaddr_in src = {.sin_family = AF_INET}, dst = {.sin_family = AF_INET};
    inet_pton(AF_INET, source, &src.sin_addr);
    inet_pton(AF_INET, "127.0.0.1", &dst.sin_addr);
    dst.sin_port = htons((uint16_t)port);
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (s < 0) die("socket");
    int one = 1;
    setsockopt(s, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (bind(s, (struct sockaddr *)&src, sizeof src) < 0) die("bind");
    if (connect(s, (struct sockaddr *)&dst, sizeof dst) < 0) die("connect");
    const char *req = "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                      "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                      "Sec-WebSocket-Version: 13\r\n\r\n";
    write_all(s, req, strlen(req));
    size_t have = 0; /* the response head, a byte at a time: frames may follow it */
    while (have < 4 || memcmp(buf + have - 4, "\r\n\r\n", 4) != 0) {
        if (have >= 4096) die("response head");
        read_all(s, buf + have, 1);
        have++;
    }
    if (memcmp(buf, "HTTP/1.1 101", 12) != 0) {
        fprintf(stderr, "ws_receivers: upgrade refused: %.40s\n", buf);
        exit(1);
    }
    size_t at;
    read_frame(s, buf, &at); /* hello */
    if (join) {
        send_text(s, "{\"op\":\"join\",\"room\":\"all\"}");
        size_t len = read_frame(s, buf, &at);
        if (len - at < 15 || memmem(buf + at, len - at, "\"joined\"", 8) == NULL) {
            fprintf(stderr, "ws_receivers: join not answered with joined\n");
            exit(1);
        }
    }
    return s;
}

/* The stamp in a message's payload: the number after "t":. */
static uint64_t stamp_of(const unsigned char *payload, size_t n) {
    const unsigned char *t = memmem(payload, n, "\"t\":", 4);
    if (!t) die("a message without a stamp");
    return strtoull((const char *)t + 4, NULL, 10);
}

/* What a receiver reads with: its sockets and a buffer. */
struct ws_receiver {
    int *socks;
    unsigned char *buf;
};

/* Whole frames: the server writes each with one send(), so a read ends on a frame boundary
 * unless the socket's buffer split it; then the rest is read now (it is in flight on loopback).
 * Text frames are the room's messages; anything else (a ping) is skipped. */
static uint64_t take_messages(void *ctx, int i, uint64_t t, uint32_t *lat) {
    struct ws_receiver *w = ctx;
    int s = w->socks[i];
    unsigned char *buf = w->buf;
    ssize_t rd = recv(s, buf, BUF, 0);
    if (rd <= 0) {
        if (rd < 0 && errno == EAGAIN) return 0;
        die("recv");
    }
    uint64_t took = 0;
    size_t off = 0, at;
    for (;;) {
        size_t len = frame_len(buf + off, (size_t)rd - off, &at);
        if ((size_t)rd == off) break;
        if (len == 0 || off + len > (size_t)rd) {
            size_t need = len ? off + len - (size_t)rd : 2;
            struct pollfd pfd = {.fd = s, .events = POLLIN};
            if (poll(&pfd, 1, TIMEOUT_MS) <= 0) die("a split frame never completed");
            ssize_t more = recv(s, buf + rd, need, 0);
            if (more <= 0 && !(more < 0 && errno == EAGAIN)) die("recv (rest)");
            if (more > 0) rd += more;
            continue;
        }
        if ((buf[off] & 0x0f) == 1) {
            lat[took++] = (uint32_t)((t - stamp_of(buf + off + at, len - at)) / 1000);
        }
        off += len;
    }
    return took;
}

/* A receiver: `n` members from `source`, then per round every member's `messages` messages. */
static void receiver(const char *source, int port, int n, int messages, int rounds, int rep) {
    int ep = epoll_create1(0);
    if (ep < 0) die("epoll_create1");
    struct ws_receiver w = {
        .socks = malloc(sizeof(int) * (size_t)n),
        .buf = malloc(2 * BUF),
    };
    uint32_t *lat = malloc(sizeof(uint32_t) * (size_t)n * (size_t)messages);
    if (!w.socks || !w.buf || !lat) die("malloc");
    for (int i = 0; i < n; i++) {
        int s = open_ws(source, port, 1, w.buf);
        watch_socket(ep, s, i);
        w.socks[i] = s;
    }
    receive_rounds(ep, n, messages, rounds, rep, NULL, lat, take_messages, &w);
}

int main(int argc, char **argv) {
    if (argc < 6) {
        fprintf(stderr, "usage: ws_receivers PORT MEMBERS PROCESSES MESSAGES ROUNDS [SERVER_PID...]\n");
        return 2;
    }
    int port = atoi(argv[1]), members = atoi(argv[2]), procs = atoi(argv[3]);
    int messages = atoi(argv[4]), rounds = atoi(argv[5]);
    if (port < 1 || members < 1 || procs < 1 || procs > MAX_PROCESSES || messages < 1 ||
        rounds < 1) {
        fprintf(stderr, "ws_receivers: bad arguments\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    int rep[MAX_PROCESSES][2], share[MAX_PROCESSES];
    pid_t kids[MAX_PROCESSES];
    for (int p = 0; p < procs; p++) {
        share[p] = members / procs + (p < members % procs);
        if (pipe(rep[p]) < 0) die("pipe");
        char source[32];
        snprintf(source, sizeof source, "127.0.0.%d", 2 + p);
        pid_t r = fork();
        if (r < 0) die("fork");
        if (r == 0) receiver(source, port, share[p], messages, rounds, rep[p][1]);
        kids[p] = r;
    }
    char ok;
    for (int p = 0; p < procs; p++) read_all(rep[p][0], &ok, 1);
    unsigned char *buf = malloc(2 * BUF);
    if (!buf) die("malloc");
    int publisher = open_ws("127.0.0.1", port, 0, buf);
    /* Every member's join has crossed the server's workers once the room's count says so
     * (docs/protocol.md: counts travel the bus asynchronously, and a message published before
     * they settle could miss a member). */
    for (int tries = 0;; tries++) {
        send_text(publisher, "{\"op\":\"count\",\"room\":\"all\"}");
        size_t at, len = read_frame(publisher, buf, &at);
        buf[len] = 0;
        const char *m = memmem(buf + at, len - at, "\"members\":", 10);
        long counted = m ? strtol(m + 10, NULL, 10) : -1;
        if (counted == members) break;
        if (tries == 300) {
            fprintf(stderr, "ws_receivers: the room counts %ld members, not %d, after 30 s\n",
                    counted, members);
            exit(1);
        }
        usleep(100000);
    }
    uint64_t deliveries = (uint64_t)members * (uint64_t)messages;
    uint32_t *all = malloc(sizeof(uint32_t) * deliveries * (uint64_t)rounds);
    uint32_t *round_lat = malloc(sizeof(uint32_t) * deliveries);
    if (!all || !round_lat) die("malloc");
    printf("{\"members\": %d, \"processes\": %d, \"messages\": %d, \"rounds\": [", members, procs,
           messages);
    uint64_t cpu = 0;
    for (int r = 0; r < rounds; r++) {
        usleep(500000); /* let the previous round's acknowledgements drain */
        uint64_t cpu0 = cpu_of(argv + 6, argc - 6);
        uint64_t stamp = now_ns();
        char text[128];
        snprintf(text, sizeof text, "{\"op\":\"publish\",\"room\":\"all\",\"data\":{\"t\":%" PRIu64 "}}",
                 stamp);
        for (int m = 0; m < messages; m++) send_text(publisher, text);
        uint64_t filled = 0;
        for (int p = 0; p < procs; p++) {
            size_t n = (size_t)share[p] * (size_t)messages;
            read_all(rep[p][0], round_lat + filled, sizeof(uint32_t) * n);
            filled += n;
        }
        cpu += cpu_of(argv + 6, argc - 6) - cpu0;
        memcpy(all + (uint64_t)r * deliveries, round_lat, sizeof(uint32_t) * deliveries);
        qsort(round_lat, deliveries, sizeof(uint32_t), cmp_u32);
        printf("%s{\"p50_us\": %u, \"p99_us\": %u, \"max_us\": %u}", r ? ", " : "",
               round_lat[deliveries / 2], round_lat[deliveries * 99 / 100], round_lat[deliveries - 1]);
        fflush(stdout);
    }
    uint64_t n_all = deliveries * (uint64_t)rounds;
    qsort(all, n_all, sizeof(uint32_t), cmp_u32);
    printf("], \"p50_us\": %u, \"p99_us\": %u, \"max_us\": %u, \"server_cpu_ns_per_delivery\": %.1f}\n",
           all[n_all / 2], all[n_all * 99 / 100], all[n_all - 1], (double)cpu / (double)n_all);
    for (int k = 0; k < procs; k++) waitpid(kids[k], NULL, 0);
    return 0;
}
