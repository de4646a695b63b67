/*
 * The floor for a broadcast: what one send() per socket costs the kernel, with nothing else.
 *
 *   send_floor MEMBERS PROCESSES FRAME_BYTES MESSAGES ROUNDS [spread|paired]
 *
 * PROCESSES sender processes each accept about MEMBERS / PROCESSES loopback TCP connections
 * (one listener each on 127.0.0.1, an ephemeral port) from as many receiver processes, which
 * connect from their own source address (127.0.0.2 + i, so ports never run out). LAYOUT says
 * which receiver talks to which sender: `spread` (the default) sends receiver i's connections
 * to every sender in turn, as the kernel spreads a client's connections over a server's
 * SO_REUSEPORT workers; `paired` sends all of receiver i's to sender i, a layout a server
 * cannot choose, cheaper on shared cores (a receiver woken by one sender only sleeps less).
 * Descriptors stay under RLIMIT_NOFILE per process, as tunegate's workers do. Then ROUNDS times: the parent stamps
 * CLOCK_MONOTONIC and tells every sender at once (one byte on a pipe each); each sender writes
 * MESSAGES frames of FRAME_BYTES (a WebSocket text frame header and padding, the stamp inside),
 * each to every one of its sockets in turn (one send() per socket per message, as a server
 * fans a message out), and once every receiver is done reports the CPU time it spent since the
 * stamp (the sends and the acknowledgements its sockets processed after); each receiver reads
 * until it has every
 * message of the round on every socket and reports, per delivery, the microseconds from the
 * stamp to its read. The parent prints one JSON object: per round p50/p99/max and the senders'
 * CPU per delivery, over all rounds the same.
 *
 * This is deliberately the least a server can do: no parsing, no framing per socket (the frame
 * is built once), no queues. Both ends share the machine's cores, as they do in bench/broadcast.sh.
 * Bounded: every wait has a timeout (30 s); a stuck round fails the run.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "floor_common.h"

#define MAX_PROCESSES 64

static uint64_t cpu_ns(void) {
    struct rusage u;
    getrusage(RUSAGE_SELF, &u);
    return ((uint64_t)u.ru_utime.tv_sec + (uint64_t)u.ru_stime.tv_sec) * 1000000000u +
           ((uint64_t)u.ru_utime.tv_usec + (uint64_t)u.ru_stime.tv_usec) * 1000u;
}

/* A sender: accepts `n` connections, says ready, then per round sends `messages` frames to every
 * socket when the parent's stamp comes, and answers with the CPU it spent. */
static void sender(int listener, int n, int frame_bytes, int messages, int rounds, int cmd, int rep) {
    int *socks = malloc(sizeof(int) * (size_t)n);
    if (!socks) die("malloc");
    for (int i = 0; i < n; i++) {
        socks[i] = accept(listener, NULL, NULL);
        if (socks[i] < 0) die("accept");
        int one = 1;
        setsockopt(socks[i], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    char ok = 'r';
    write_all(rep, &ok, 1);
    /* A server-to-client text frame: FIN + text, then the length, then the payload. */
    unsigned char *frame = malloc((size_t)frame_bytes);
    if (!frame) die("malloc");
    size_t header = frame_bytes - 2 <= 125 ? 2 : 4;
    size_t payload = (size_t)frame_bytes - header;
    frame[0] = 0x81;
    if (header == 2) {
        frame[1] = (unsigned char)payload;
    } else {
        frame[1] = 126;
        frame[2] = (unsigned char)(payload >> 8);
        frame[3] = (unsigned char)payload;
    }
    memset(frame + header, 'x', payload);
    for (int r = 0; r < rounds; r++) {
        uint64_t stamp;
        read_all(cmd, &stamp, sizeof stamp);
        uint64_t cpu0 = cpu_ns();
        uint64_t failed = 0;
        for (int m = 0; m < messages; m++) {
            memcpy(frame + header, &stamp, sizeof stamp);
            for (int i = 0; i < n; i++) {
                ssize_t w = send(socks[i], frame, (size_t)frame_bytes, MSG_DONTWAIT | MSG_NOSIGNAL);
                if (w != frame_bytes) failed++;
            }
        }
        uint64_t done;
        read_all(cmd, &done, sizeof done); /* every receiver has the round */
        uint64_t report[2] = {cpu_ns() - cpu0, failed};
        write_all(rep, report, sizeof report);
    }
    exit(0);
}

/* What a floor receiver reads with: its sockets, a buffer, the frame's size. */
struct floor_receiver {
    int *socks;
    uint32_t *got;
    unsigned char *buf;
    int frame_bytes, messages;
    size_t header;
};

/* Whole frames only: every frame is frame_bytes, and the sender writes each with one send(),
 * so a read ends on a frame boundary unless the socket's buffer split it; leftovers are read on
 * the next readiness. */
static uint64_t take_frames(void *ctx, int i, uint64_t t, uint32_t *lat) {
    struct floor_receiver *f = ctx;
    size_t frame_bytes = (size_t)f->frame_bytes;
    size_t room = frame_bytes * (size_t)(f->messages - (int)f->got[i]);
    size_t cap = (1 << 16) / frame_bytes * frame_bytes;
    if (room == 0) return 0;
    ssize_t rd = recv(f->socks[i], f->buf, room < cap ? room : cap, 0);
    if (rd <= 0) {
        if (rd < 0 && errno == EAGAIN) return 0;
        die("recv");
    }
    if ((size_t)rd % frame_bytes != 0) {
        /* A split frame: read the rest now (it is in flight on loopback). */
        size_t need = frame_bytes - (size_t)rd % frame_bytes;
        struct pollfd pfd = {.fd = f->socks[i], .events = POLLIN};
        while (need > 0 && poll(&pfd, 1, TIMEOUT_MS) > 0) {
            ssize_t more = recv(f->socks[i], f->buf + rd, need, 0);
            if (more <= 0) break;
            rd += more;
            need -= (size_t)more;
        }
    }
    uint64_t took = 0;
    for (size_t off = 0; off + frame_bytes <= (size_t)rd; off += frame_bytes) {
        uint64_t stamp;
        memcpy(&stamp, f->buf + off + f->header, sizeof stamp);
        lat[took++] = (uint32_t)((t - stamp) / 1000);
    }
    f->got[i] += (uint32_t)took;
    return took;
}

/* A receiver: connects `n` sockets from `source`, the i-th to ports[i % nports], says ready,
 * then per round reads `messages` frames from every socket and sends the parent one latency
 * (us) per delivery. */
static void receiver(const char *source, const int *ports, int nports, int n, int frame_bytes,
                     int messages, int rounds, int rep) {
    prctl(PR_SET_NAME, "floor_receiver"); /* told apart from the senders in ps and perf */
    int ep = epoll_create1(0);
    if (ep < 0) die("epoll_create1");
    struct floor_receiver f = {
        .socks = malloc(sizeof(int) * (size_t)n),
        .got = calloc((size_t)n, sizeof(uint32_t)),
        .buf = malloc((1 << 16) + (size_t)frame_bytes),
        .frame_bytes = frame_bytes,
        .messages = messages,
        .header = frame_bytes - 2 <= 125 ? 2 : 4,
    };
    uint32_t *lat = malloc(sizeof(uint32_t) * (size_t)n * (size_t)messages);
    if (!f.socks || !f.got || !f.buf || !lat) die("malloc");
    struct sockaddr_in src = {.sin_family = AF_INET}, dst = {.sin_family = AF_INET};
    inet_pton(AF_INET, source, &src.sin_addr);
    inet_pton(AF_INET, "127.0.0.1", &dst.sin_addr);
    for (int i = 0; i < n; i++) {
        dst.sin_port = htons((uint16_t)ports[i % nports]);
        int s = socket(AF_INET, SOCK_STREAM, 0);
        if (s < 0) die("socket");
        int one = 1;
        setsockopt(s, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        if (bind(s, (struct sockaddr *)&src, sizeof src) < 0) die("bind");
        if (connect(s, (struct sockaddr *)&dst, sizeof dst) < 0) die("connect");
        watch_socket(ep, s, i);
        f.socks[i] = s;
    }
    receive_rounds(ep, n, messages, rounds, rep, f.got, lat, take_frames, &f);
}

int main(int argc, char **argv) {
    if (argc != 6 && argc != 7) {
        fprintf(stderr, "usage: send_floor MEMBERS PROCESSES FRAME_BYTES MESSAGES ROUNDS [spread|paired]\n");
        return 2;
    }
    int members = atoi(argv[1]), procs = atoi(argv[2]), frame_bytes = atoi(argv[3]);
    int messages = atoi(argv[4]), rounds = atoi(argv[5]);
    int spread = argc == 6 || strcmp(argv[6], "spread") == 0;
    if (members < 1 || procs < 1 || procs > MAX_PROCESSES || frame_bytes < 12 ||
        frame_bytes > 60000 || messages < 1 || rounds < 1 ||
        (argc == 7 && !spread && strcmp(argv[6], "paired") != 0)) {
        fprintf(stderr, "send_floor: bad arguments\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    int cmd[MAX_PROCESSES][2], srep[MAX_PROCESSES][2], rrep[MAX_PROCESSES][2], share[MAX_PROCESSES];
    int listeners[MAX_PROCESSES], ports[MAX_PROCESSES], accepts[MAX_PROCESSES] = {0};
    pid_t kids[2 * MAX_PROCESSES];
    int nkids = 0;
    for (int p = 0; p < procs; p++) {
        share[p] = members / procs + (p < members % procs);
        int l = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in a = {.sin_family = AF_INET};
        inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
        socklen_t len = sizeof a;
        if (l < 0 || bind(l, (struct sockaddr *)&a, sizeof a) < 0 || listen(l, 65535) < 0 ||
            getsockname(l, (struct sockaddr *)&a, &len) < 0)
            die("listen");
        listeners[p] = l;
        ports[p] = ntohs(a.sin_port);
        if (pipe(cmd[p]) < 0 || pipe(srep[p]) < 0 || pipe(rrep[p]) < 0) die("pipe");
    }
    /* Receiver p's i-th connection goes to sender (p + i) % procs when spread, to sender p when
     * paired; each sender accepts what comes its way. */
    for (int p = 0; p < procs; p++) {
        if (!spread) accepts[p] += share[p];
        else for (int i = 0; i < share[p]; i++) accepts[(p + i) % procs]++;
    }
    for (int p = 0; p < procs; p++) {
        pid_t s = fork();
        if (s < 0) die("fork");
        if (s == 0) sender(listeners[p], accepts[p], frame_bytes, messages, rounds, cmd[p][0], srep[p][1]);
        kids[nkids++] = s;
    }
    for (int p = 0; p < procs; p++) close(listeners[p]);
    for (int p = 0; p < procs; p++) {
        int to[MAX_PROCESSES];
        int nto = spread ? procs : 1;
        for (int k = 0; k < nto; k++) to[k] = ports[spread ? (p + k) % procs : p];
        char source[32];
        snprintf(source, sizeof source, "127.0.0.%d", 2 + p);
        pid_t r = fork();
        if (r < 0) die("fork");
        if (r == 0) receiver(source, to, nto, share[p], frame_bytes, messages, rounds, rrep[p][1]);
        kids[nkids++] = r;
    }
    char ok;
    for (int p = 0; p < procs; p++) {
        read_all(srep[p][0], &ok, 1);
        read_all(rrep[p][0], &ok, 1);
    }
    uint64_t deliveries = (uint64_t)members * (uint64_t)messages;
    uint32_t *all = malloc(sizeof(uint32_t) * deliveries * (uint64_t)rounds);
    uint32_t *round_lat = malloc(sizeof(uint32_t) * deliveries);
    if (!all || !round_lat) die("malloc");
    uint64_t total_cpu = 0, total_failed = 0;
    printf("{\"members\": %d, \"processes\": %d, \"frame_bytes\": %d, \"messages\": %d, \"rounds\": [",
           members, procs, frame_bytes, messages);
    for (int r = 0; r < rounds; r++) {
        usleep(200000); /* let the previous round's acknowledgements drain */
        uint64_t stamp = now_ns();
        for (int p = 0; p < procs; p++) write_all(cmd[p][1], &stamp, sizeof stamp);
        uint64_t cpu = 0, failed = 0, filled = 0, done = 0;
        for (int p = 0; p < procs; p++) {
            size_t n = (size_t)share[p] * (size_t)messages;
            read_all(rrep[p][0], round_lat + filled, sizeof(uint32_t) * n);
            filled += n;
        }
        for (int p = 0; p < procs; p++) write_all(cmd[p][1], &done, sizeof done);
        for (int p = 0; p < procs; p++) {
            uint64_t report[2];
            read_all(srep[p][0], report, sizeof report);
            cpu += report[0];
            failed += report[1];
        }
        memcpy(all + (uint64_t)r * deliveries, round_lat, sizeof(uint32_t) * deliveries);
        qsort(round_lat, deliveries, sizeof(uint32_t), cmp_u32);
        total_cpu += cpu;
        total_failed += failed;
        printf("%s{\"p50_us\": %u, \"p99_us\": %u, \"max_us\": %u, \"sender_cpu_ns_per_delivery\": %.1f, \"failed_sends\": %llu}",
               r ? ", " : "", round_lat[deliveries / 2], round_lat[deliveries * 99 / 100],
               round_lat[deliveries - 1], (double)cpu / (double)deliveries, (unsigned long long)failed);
    }
    uint64_t n_all = deliveries * (uint64_t)rounds;
    qsort(all, n_all, sizeof(uint32_t), cmp_u32);
    printf("], \"p50_us\": %u, \"p99_us\": %u, \"max_us\": %u, \"sender_cpu_ns_per_delivery\": %.1f, \"failed_sends\": %llu}\n",
           all[n_all / 2], all[n_all * 99 / 100], all[n_all - 1], (double)total_cpu / (double)n_all,
           (unsigned long long)total_failed);
    for (int k = 0; k < nkids; k++) waitpid(kids[k], NULL, 0);
    return total_failed ? 1 : 0;
}
