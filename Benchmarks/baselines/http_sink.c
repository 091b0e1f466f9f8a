/*
 * The HTTP ceiling: a server that does nothing with a batch but read it. One thread, epoll,
 * HTTP/1.1 keep-alive: it reads each request (headers, then `Content-Length` bytes of body),
 * requires an `Authorization` header (401 without), and answers `202` with a small JSON body;
 * `GET /healthz` answers 200. Nothing is parsed, stored or forwarded.
 *
 * Driven by the same wrk script as Sluice and the peer, it measures what this machine's loopback
 * TCP and the load generator allow any HTTP forwarder to take in: no forwarder, Sluice or another,
 * accepts more requests per second than this on the same machine.
 *
 *   http_sink PORT
 *
 * Build: gcc -O2 -o http_sink http_sink.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_HEADER 16384
#define MAX_BODY (4 << 20)

typedef struct {
    int fd;
    char head[MAX_HEADER]; /* the request's head, until its blank line */
    size_t head_len;
    long body_left;       /* body bytes still to read; -1: reading the head */
    int authorized, healthz;
} conn_t;

static const char accepted[] =
    "HTTP/1.1 202 Accepted\r\ncontent-type: application/json\r\ncontent-length: 15\r\n\r\n{\"accepted\":1}\n";
static const char unauthorized[] =
    "HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\ncontent-length: 25\r\n\r\n{\"error\":\"unauthorized\"}\n";
static const char healthy[] = "HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n";
static const char bad[] = "HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";

static int send_all(int fd, const char *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1; /* a 100-byte answer on a socket with an empty send buffer */
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Looks at a complete head: its Content-Length, whether it carries Authorization, its path. */
static int parse_head(conn_t *c) {
    c->head[c->head_len] = 0;
    c->healthz = strncmp(c->head, "GET /healthz ", 13) == 0;
    c->authorized = 0;
    long length = 0;
    char *line = strstr(c->head, "\r\n");
    while (line && line[2] != '\r') {
        line += 2;
        if (strncasecmp(line, "content-length:", 15) == 0) {
            char *end;
            length = strtol(line + 15, &end, 10);
            if (length < 0 || length > MAX_BODY) return -1;
        } else if (strncasecmp(line, "authorization:", 14) == 0) {
            c->authorized = 1;
        } else if (strncasecmp(line, "transfer-encoding:", 18) == 0) {
            return -1; /* wrk sends Content-Length */
        }
        line = strstr(line, "\r\n");
    }
    c->body_left = length;
    return 0;
}

static int answer(conn_t *c) {
    if (c->healthz) return send_all(c->fd, healthy, sizeof healthy - 1);
    return c->authorized ? send_all(c->fd, accepted, sizeof accepted - 1)
                         : send_all(c->fd, unauthorized, sizeof unauthorized - 1);
}

/* Consumes what arrived; -1: close the connection. */
static int feed(conn_t *c, const char *p, size_t n) {
    while (n > 0) {
        if (c->body_left < 0) {
            size_t take = n < MAX_HEADER - 1 - c->head_len ? n : MAX_HEADER - 1 - c->head_len;
            if (take == 0) return send_all(c->fd, bad, sizeof bad - 1), -1;
            memcpy(c->head + c->head_len, p, take);
            size_t before = c->head_len;
            c->head_len += take;
            c->head[c->head_len] = 0;
            /* the blank line may straddle two reads: look from 3 bytes before the new ones */
            char *end = strstr(c->head + (before > 3 ? before - 3 : 0), "\r\n\r\n");
            if (!end) { p += take; n -= take; continue; }
            size_t used = (size_t)(end + 4 - c->head) - before;
            c->head_len = (size_t)(end + 4 - c->head);
            if (parse_head(c) < 0) return send_all(c->fd, bad, sizeof bad - 1), -1;
            p += used;
            n -= used;
        }
        size_t body = (size_t)c->body_left < n ? (size_t)c->body_left : n;
        c->body_left -= (long)body;
        p += body;
        n -= body;
        if (c->body_left == 0) {
            if (answer(c) < 0) return -1;
            c->body_left = -1;
            c->head_len = 0;
        }
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: http_sink PORT\n"); return 2; }
    signal(SIGPIPE, SIG_IGN);
    int listener = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[1])),
                               .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (bind(listener, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(listener, 512) < 0) {
        perror("http_sink: listen");
        return 1;
    }
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, listener, &ev);
    static char buf[1 << 16];
    struct epoll_event events[64];
    for (;;) {
        int n = epoll_wait(ep, events, 64, -1);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) { perror("http_sink: epoll_wait"); return 1; }
        for (int i = 0; i < n; i++) {
            conn_t *c = events[i].data.ptr;
            if (!c) {
                int fd;
                while ((fd = accept4(listener, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    conn_t *nc = calloc(1, sizeof *nc);
                    nc->fd = fd;
                    nc->body_left = -1;
                    struct epoll_event cev = {.events = EPOLLIN, .data.ptr = nc};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &cev);
                }
                continue;
            }
            for (;;) {
                ssize_t r = read(c->fd, buf, sizeof buf);
                if (r > 0 && feed(c, buf, (size_t)r) == 0) {
                    if ((size_t)r < sizeof buf) break; /* drained */
                    continue;
                }
                if (r < 0 && (errno == EAGAIN || errno == EINTR)) break;
                close(c->fd); /* closed by the peer, an error, or a bad request */
                free(c);
                break;
            }
        }
    }
}
