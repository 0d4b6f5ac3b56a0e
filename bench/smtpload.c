/*
 * smtpload: the SMTP load generator of bench/intake.py.
 *
 *     smtpload HOST PORT CONCURRENCY MSGFILE OUTFILE
 *
 * Why C: the servers under test share a 2-core machine with the load generator, and a
 * Python asyncio client took about a core away from them. Postfix's smtp-source (which
 * the reference figures used) is as cheap but cannot report per-message latency.
 *
 * Each message goes over a new TCP connection, CONCURRENCY connections in flight at once,
 * messages taken in file order: 220 greeting, EHLO bench.client, MAIL FROM:<sender>,
 * RCPT TO:<recipient>, DATA (354), payload, 250, then QUIT and close without waiting for
 * the 221. Any failure (connect error, unexpected reply code, connection closed) ends the
 * attempt; after 50 ms the message is tried again, three attempts in all, then counted
 * as failed. This is what bench/intake.py's Python client (send_one/load) does.
 *
 * MSGFILE: one record per message until end of file, each three fields
 *     u32 length, bytes   sender (goes inside <> as is)
 *     u32 length, bytes   recipient
 *     u32 length, bytes   DATA payload, already dot-stuffed, ending in "\r\n.\r\n"
 * lengths big-endian (network order).
 *
 * OUTFILE: one line per successful message, in completion order: the latency in seconds,
 * from the moment the payload's last byte was written to the socket to the moment the
 * final 250 line was read (CLOCK_MONOTONIC).
 *
 * stdout, at the end: {"ok": N, "failed": M, "seconds": S}, S the wall time from the
 * first connect to the last message finished. Exit status 0 when every message was tried
 * (failures included), 2 on bad arguments or input.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define ATTEMPTS 3
#define RETRY_DELAY_NS 50000000LL
#define MAX_ADDR 512 /* RFC 5321 allows 256; more means a broken MSGFILE */
#define RBUF 4096    /* reply lines are short; a longer one is a protocol error */

struct msg {
    const char *sender, *rcpt, *payload;
    uint32_t sender_len, rcpt_len, payload_len;
};

/* What the connection waits for; the reply states name the command sent last. */
enum state { IDLE, CONNECTING, GREETING, EHLO, MAIL, RCPT, DATA, PAYLOAD, RETRY_WAIT };

struct conn {
    int fd;
    enum state st;
    size_t msg;
    int attempt;
    int64_t retry_at;
    int64_t sent_at;
    const char *out;
    size_t out_len, out_off;
    size_t rlen;
    char cmd[MAX_ADDR + 32];
    char rbuf[RBUF];
};

static struct msg *msgs;
static size_t n_msgs, next_msg, n_done, n_ok, n_failed;
static double *latencies;
static int64_t t_end;
static int ep;
static struct addrinfo *target;

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void start(struct conn *c);

static void take_next(struct conn *c)
{
    if (next_msg == n_msgs) {
        c->st = IDLE;
        return;
    }
    c->msg = next_msg++;
    c->attempt = 0;
    start(c);
}

static void finish(struct conn *c, int ok)
{
    if (ok)
        n_ok++;
    else
        n_failed++;
    n_done++;
    t_end = now_ns();
    take_next(c);
}

static void fail(struct conn *c)
{
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
    c->st = RETRY_WAIT;
    c->retry_at = now_ns() + RETRY_DELAY_NS;
}

static void start(struct conn *c)
{
    c->attempt++;
    c->rlen = 0;
    c->out_len = c->out_off = 0;
    c->st = CONNECTING;
    c->fd = socket(target->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) {
        fail(c);
        return;
    }
    /* asyncio sets TCP_NODELAY too; without it a command's reply waits on delayed ACKs. */
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(c->fd, target->ai_addr, target->ai_addrlen) < 0 && errno != EINPROGRESS) {
        fail(c);
        return;
    }
    /* Edge-triggered, registered once: no epoll_ctl per command. Adding an fd that is
     * already writable reports it, so an immediate connect is handled like a late one. */
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLET, .data.ptr = c};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev) < 0)
        fail(c);
}

/* Writes what is pending until done or the socket is full. */
static int flush(struct conn *c)
{
    while (c->out_off < c->out_len) {
        ssize_t w = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return errno == EAGAIN || errno == EWOULDBLOCK ? 0 : -1;
        }
        c->out_off += (size_t)w;
        if (c->out_off == c->out_len && c->st == PAYLOAD)
            c->sent_at = now_ns();
    }
    return 0;
}

static int send_out(struct conn *c, enum state st, const char *data, size_t len)
{
    c->st = st;
    c->out = data;
    c->out_len = len;
    c->out_off = 0;
    return flush(c);
}

/* MAIL FROM:<...> or RCPT TO:<...> */
static int send_addr(struct conn *c, enum state st, const char *verb, const char *addr,
                     uint32_t len)
{
    int n = snprintf(c->cmd, sizeof c->cmd, "%s:<%.*s>\r\n", verb, (int)len, addr);
    return send_out(c, st, c->cmd, (size_t)n);
}

/* A final reply with the expected code arrived: next command. 1 when the message is done
 * (the connection is closed and c already holds the next message). */
static int advance(struct conn *c)
{
    const struct msg *m = &msgs[c->msg];
    switch (c->st) {
    case GREETING:
        return send_out(c, EHLO, "EHLO bench.client\r\n", 19);
    case EHLO:
        return send_addr(c, MAIL, "MAIL FROM", m->sender, m->sender_len);
    case MAIL:
        return send_addr(c, RCPT, "RCPT TO", m->rcpt, m->rcpt_len);
    case RCPT:
        return send_out(c, DATA, "DATA\r\n", 6);
    case DATA:
        return send_out(c, PAYLOAD, m->payload, m->payload_len);
    case PAYLOAD:
        latencies[n_ok] = (double)(now_ns() - c->sent_at) / 1e9;
        /* Best effort, as the Python client: the 221 is not awaited. */
        if (send(c->fd, "QUIT\r\n", 6, MSG_NOSIGNAL) < 0) {
            /* nothing to do: the message was accepted */
        }
        close(c->fd);
        c->fd = -1;
        finish(c, 1);
        return 1;
    default:
        return -1;
    }
}

static const char *expected(enum state st)
{
    switch (st) {
    case GREETING:
        return "220";
    case DATA:
        return "354";
    default:
        return "250";
    }
}

/* Consumes the complete reply lines read so far: 0 to go on reading, 1 when the message
 * is done, -1 on a protocol error. */
static int parse(struct conn *c)
{
    char *nl;
    while ((nl = memchr(c->rbuf, '\n', c->rlen)) != NULL) {
        size_t len = (size_t)(nl - c->rbuf) + 1;
        int final = !(len >= 4 && c->rbuf[3] == '-');
        int code_ok = len >= 3 && memcmp(c->rbuf, expected(c->st), 3) == 0;
        c->rlen -= len;
        memmove(c->rbuf, c->rbuf + len, c->rlen);
        if (!final)
            continue;
        /* A reply before our command is fully written is a rejection (e.g. mid-DATA). */
        if (!code_ok || c->out_off < c->out_len)
            return -1;
        int r = advance(c);
        if (r != 0)
            return r;
    }
    return c->rlen == RBUF ? -1 : 0;
}

static void handle(struct conn *c, uint32_t events)
{
    if (c->fd < 0)
        return;
    if (c->st == CONNECTING) {
        if (!(events & (EPOLLOUT | EPOLLERR | EPOLLHUP)))
            return;
        int err = 0;
        socklen_t len = sizeof err;
        if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0 || err) {
            fail(c);
            return;
        }
        c->st = GREETING;
    }
    if (flush(c) < 0) {
        fail(c);
        return;
    }
    /* Edge-triggered: read until the socket is empty or the message is done. */
    for (;;) {
        ssize_t r = read(c->fd, c->rbuf + c->rlen, RBUF - c->rlen);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return;
        if (r <= 0) {
            fail(c);
            return;
        }
        c->rlen += (size_t)r;
        int p = parse(c);
        if (p < 0)
            fail(c);
        if (p != 0)
            return;
    }
}

static uint32_t be32(const unsigned char *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* Takes one length-prefixed field at *pos; 0 if the file ends inside it. */
static int field(const unsigned char *buf, size_t size, size_t *pos, const char **out,
                 uint32_t *len)
{
    if (size - *pos < 4)
        return 0;
    *len = be32(buf + *pos);
    *pos += 4;
    if (size - *pos < *len)
        return 0;
    *out = (const char *)buf + *pos;
    *pos += *len;
    return 1;
}

static int load_msgs(const char *path)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0) {
        perror(path);
        return -1;
    }
    size_t size = (size_t)st.st_size;
    const unsigned char *buf = NULL;
    if (size > 0) {
        void *map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (map == MAP_FAILED) {
            perror(path);
            return -1;
        }
        buf = map;
    }
    close(fd);
    size_t cap = 1024, pos = 0;
    msgs = malloc(cap * sizeof *msgs);
    if (!msgs)
        return -1;
    while (pos < size) {
        if (n_msgs == cap) {
            cap *= 2;
            struct msg *grown = realloc(msgs, cap * sizeof *msgs);
            if (!grown)
                return -1;
            msgs = grown;
        }
        struct msg *m = &msgs[n_msgs];
        if (!field(buf, size, &pos, &m->sender, &m->sender_len) ||
            !field(buf, size, &pos, &m->rcpt, &m->rcpt_len) ||
            !field(buf, size, &pos, &m->payload, &m->payload_len)) {
            fprintf(stderr, "%s: truncated record %zu\n", path, n_msgs);
            return -1;
        }
        if (m->sender_len > MAX_ADDR || m->rcpt_len > MAX_ADDR || m->payload_len < 5 ||
            memcmp(m->payload + m->payload_len - 5, "\r\n.\r\n", 5) != 0) {
            fprintf(stderr, "%s: bad record %zu\n", path, n_msgs);
            return -1;
        }
        n_msgs++;
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc != 6) {
        fprintf(stderr, "usage: %s HOST PORT CONCURRENCY MSGFILE OUTFILE\n", argv[0]);
        return 2;
    }
    char *end;
    long concurrency = strtol(argv[3], &end, 10);
    if (*end || concurrency < 1) {
        fprintf(stderr, "bad concurrency: %s\n", argv[3]);
        return 2;
    }
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM};
    int gai = getaddrinfo(argv[1], argv[2], &hints, &target);
    if (gai) {
        fprintf(stderr, "%s:%s: %s\n", argv[1], argv[2], gai_strerror(gai));
        return 2;
    }
    if (load_msgs(argv[4]) < 0)
        return 2;
    FILE *out = fopen(argv[5], "w");
    latencies = malloc((n_msgs ? n_msgs : 1) * sizeof *latencies);
    ep = epoll_create1(EPOLL_CLOEXEC);
    if (!out || !latencies || ep < 0) {
        perror("setup");
        return 2;
    }
    size_t n_conns = (size_t)concurrency < n_msgs ? (size_t)concurrency : n_msgs;
    struct conn *conns = calloc(n_conns ? n_conns : 1, sizeof *conns);
    struct epoll_event events[256];
    if (!conns) {
        perror("setup");
        return 2;
    }

    int64_t t_start = now_ns();
    t_end = t_start;
    for (size_t i = 0; i < n_conns; i++) {
        conns[i].fd = -1;
        take_next(&conns[i]);
    }
    while (n_done < n_msgs) {
        /* Retries wait without blocking the others: epoll_wait sleeps until the first. */
        int64_t now = now_ns(), first = INT64_MAX;
        for (size_t i = 0; i < n_conns; i++)
            if (conns[i].st == RETRY_WAIT && conns[i].retry_at < first)
                first = conns[i].retry_at;
        int timeout = first == INT64_MAX ? -1
                      : first <= now    ? 0
                                        : (int)((first - now + 999999) / 1000000);
        int n = epoll_wait(ep, events, (int)(sizeof events / sizeof *events), timeout);
        if (n < 0 && errno != EINTR) {
            perror("epoll_wait");
            return 2;
        }
        for (int i = 0; i < n; i++)
            handle(events[i].data.ptr, events[i].events);
        now = now_ns();
        for (size_t i = 0; i < n_conns; i++) {
            struct conn *c = &conns[i];
            if (c->st != RETRY_WAIT || c->retry_at > now)
                continue;
            if (c->attempt >= ATTEMPTS)
                finish(c, 0);
            else
                start(c);
        }
    }

    for (size_t i = 0; i < n_ok; i++)
        fprintf(out, "%.9f\n", latencies[i]);
    if (fclose(out) != 0) {
        perror(argv[5]);
        return 2;
    }
    printf("{\"ok\": %zu, \"failed\": %zu, \"seconds\": %.6f}\n", n_ok, n_failed,
           (double)(t_end - t_start) / 1e9);
    return 0;
}
