/*
 * bench/wrk-discard.c: an LD_PRELOAD library that makes wrk drop the response bodies in the
 * kernel instead of copying them into its buffer. Built and used by bench/http.sh with
 * DISCARD=1:
 *
 *     cc -O2 -shared -fPIC -o wrk-discard.so bench/wrk-discard.c -ldl
 *     LD_PRELOAD=./wrk-discard.so wrk -t2 -c64 -d5s --latency http://127.0.0.1:8080/file-16m.bin
 *
 * Why: wrk reads every body into an 8 KiB buffer and never looks at it. For a 16 MiB file that
 * is 2,048 read(2)s and 16 MiB copied per response, which costs wrk more CPU than either server
 * spends sending it with sendfile(2): wrk is the bottleneck, and the benchmark measures wrk.
 * tcp(7): recv(2) with MSG_TRUNC on a TCP socket discards the bytes instead of copying them,
 * and the buffer is not touched, so one call can drop everything the socket holds.
 *
 * How: per fd, the library follows the responses as wrk reads them (wrk does not pipeline).
 * The head is read for real and scanned for its end and its Content-Length. Body bytes are then
 * dropped with recv(MSG_TRUNC) as many as the socket holds, and handed to wrk's parser as
 * "read" in pieces of the size wrk asked for, with the buffer left as it was: wrk's HTTP parser
 * counts body bytes without looking at them. Dropped bytes not yet handed over are added to
 * ioctl(FIONREAD), which wrk asks before it reads again. A response without Content-Length
 * (chunked), a head larger than HEAD_MAX, or a read that runs past the body's end turns the
 * library off for that connection: from then on wrk reads it for real.
 *
 * Both servers are measured through it alike. wrk's byte counts and latencies stay right: a
 * response ends when its last byte has arrived, as before. Not for wrk scripts (-s) that look
 * at bodies (they would see stale bytes), nor for HEAD requests (their Content-Length has no
 * body behind it): bench/http.sh uses neither.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_FD 65536
#define HEAD_MAX 8192

enum state { HEAD = 0, BODY, OFF };

/* Per fd; each fd belongs to one wrk thread, so no two threads touch the same slot. */
struct conn {
    enum state state;
    size_t head_len;      /* bytes of the head seen so far */
    uint64_t body_left;   /* body bytes not yet handed to wrk */
    uint64_t dropped;     /* of those, already dropped by recv(MSG_TRUNC) */
    char head[HEAD_MAX];
};

static struct conn *conns[MAX_FD];
static ssize_t (*real_read)(int, void *, size_t);
static int (*real_close)(int);
static int (*real_ioctl)(int, unsigned long, ...);

__attribute__((constructor)) static void init(void) {
    real_read = (ssize_t (*)(int, void *, size_t))dlsym(RTLD_NEXT, "read");
    real_close = (int (*)(int))dlsym(RTLD_NEXT, "close");
    real_ioctl = (int (*)(int, unsigned long, ...))dlsym(RTLD_NEXT, "ioctl");
}

/* TCP only: on other sockets (AF_UNIX) recv(MSG_TRUNC) copies, and the buffer is smaller. */
static int is_tcp(int fd) {
    int type, protocol;
    socklen_t len = sizeof type;
    if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) != 0 || type != SOCK_STREAM) return 0;
    len = sizeof protocol;
    return getsockopt(fd, SOL_SOCKET, SO_PROTOCOL, &protocol, &len) == 0 && protocol == IPPROTO_TCP;
}

/* The connection state of fd, created at its first read; NULL when fd is not followed. */
static struct conn *conn_of(int fd) {
    if (fd <= 2 || fd >= MAX_FD) return NULL;
    if (!conns[fd]) {
        if (!is_tcp(fd)) return NULL;
        conns[fd] = calloc(1, sizeof *conns[fd]);
    }
    return conns[fd];
}

/* The status code and Content-Length of a complete head; -1 when it has none. */
static int64_t content_length(const char *head, size_t len) {
    int status = 0;
    if (len < 12 || strncmp(head, "HTTP/1.", 7) != 0) return -1;
    for (int i = 9; i < 12; i++) status = status * 10 + (head[i] - '0');
    if (status < 200 || status == 204 || status == 304) return -1; /* no body: follow no more */
    for (size_t i = 0; i + 16 < len; i++) {
        if (head[i] == '\n' && strncasecmp(head + i + 1, "content-length:", 15) == 0) {
            const char *p = head + i + 16;
            while (*p == ' ' || *p == '\t') p++;
            if (*p < '0' || *p > '9') return -1;
            int64_t n = 0;
            while (*p >= '0' && *p <= '9') n = n * 10 + (*p++ - '0');
            return n;
        }
    }
    return -1;
}

/* Follow n bytes just read in the HEAD state: find the head's end, and the body's length. */
static void follow_head(struct conn *c, const char *buf, size_t n) {
    size_t old = c->head_len, room = HEAD_MAX - old, take = n < room ? n : room;
    memcpy(c->head + old, buf, take);
    c->head_len += take;
    /* The end may straddle two reads. */
    size_t from = old < 3 ? 0 : old - 3;
    const char *end = memmem(c->head + from, c->head_len - from, "\r\n\r\n", 4);
    if (!end) {
        if (c->head_len == HEAD_MAX) c->state = OFF;
        return;
    }
    size_t head_len = (size_t)(end - c->head) + 4;
    int64_t length = content_length(c->head, head_len);
    uint64_t body_here = n - (head_len - old);
    if (length < 0 || (uint64_t)length < body_here) {
        c->state = OFF;
        return;
    }
    c->head_len = 0;
    c->body_left = (uint64_t)length - body_here;
    c->dropped = 0;
    c->state = c->body_left ? BODY : HEAD;
}

ssize_t read(int fd, void *buf, size_t n) {
    struct conn *c = conn_of(fd);
    if (!c || c->state == OFF || n == 0) return real_read(fd, buf, n);
    if (c->state == HEAD) {
        ssize_t got = real_read(fd, buf, n);
        if (got > 0) follow_head(c, buf, (size_t)got);
        return got;
    }
    if (c->dropped == 0) {
        /* The buffer is not written with MSG_TRUNC: ask for the whole rest of the body. */
        ssize_t got = recv(fd, buf, c->body_left, MSG_TRUNC | MSG_DONTWAIT);
        if (got <= 0) return got;
        c->dropped = (uint64_t)got;
    }
    size_t handed = c->dropped < n ? (size_t)c->dropped : n;
    c->dropped -= handed;
    c->body_left -= handed;
    if (c->body_left == 0) c->state = HEAD;
    return (ssize_t)handed;
}

int ioctl(int fd, unsigned long request, ...) {
    va_list args;
    va_start(args, request);
    void *arg = va_arg(args, void *);
    va_end(args);
    int rc = real_ioctl(fd, request, arg);
    if (rc == 0 && request == FIONREAD && fd > 2 && fd < MAX_FD && conns[fd])
        *(int *)arg += (int)(conns[fd]->dropped > INT32_MAX / 2 ? INT32_MAX / 2 : conns[fd]->dropped);
    return rc;
}

int close(int fd) {
    if (fd > 2 && fd < MAX_FD && conns[fd]) {
        free(conns[fd]);
        conns[fd] = NULL;
    }
    return real_close(fd);
}
