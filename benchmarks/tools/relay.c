/*
 * relay: the plain TCP relay that benchmarks/perf.py compares gimapproxy with. It copies
 * bytes both ways between each client and its own connection to the target and does
 * nothing else, so it shows what relaying alone costs on this machine: a proxy cannot
 * do better.
 *
 *   relay LISTEN_PORT TARGET_PORT [LISTEN_ADDR [TARGET_ADDR]]     (IPv4, 127.0.0.1)
 *
 * One thread, one epoll loop, TCP_NODELAY on both sockets. Bytes are read into one
 * shared buffer and written on at once; only what the receiver cannot take yet is kept
 * (per direction), and reading from the sender stops until it has been written, so an
 * idle connection costs two sockets and a small struct.
 *
 * Build: gcc -O2 -o relay relay.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

struct link;

/* One socket of a link; `peer` is the other one. */
struct end {
    int fd;
    struct link *link;
    struct end *peer;
    uint32_t events;
    char *backlog;         /* bytes for this socket that it could not take yet */
    size_t backlog_len, backlog_sent;
};

struct link {
    struct end client, target;
    int target_ready;      /* the connect to the target finished */
    int closing;           /* one side ended: write what is owed, then close */
    struct link *next_free;
};

static int epfd;
static struct sockaddr_in target_addr;
static char shared[256 * 1024];
static struct link *to_free;   /* freed after each epoll batch: later events may name them */
static struct end listener;

static void set_events(struct end *e, uint32_t events)
{
    if (e->events == events) return;
    struct epoll_event ev = {.events = events, .data.ptr = e};
    epoll_ctl(epfd, EPOLL_CTL_MOD, e->fd, &ev);
    e->events = events;
}

static void end_close(struct end *e)
{
    if (e->fd >= 0) close(e->fd);
    e->fd = -1;
    free(e->backlog);
    e->backlog = NULL;
}

static void link_close(struct link *l)
{
    if (l->client.fd < 0 && l->target.fd < 0) return;
    end_close(&l->client);
    end_close(&l->target);
    l->next_free = to_free;
    to_free = l;
}

/* Write what `e` is owed. Returns 0 when all is written, 1 when the socket is full,
 * -1 when it failed. */
static int drain(struct end *e)
{
    while (e->backlog_sent < e->backlog_len) {
        ssize_t n = write(e->fd, e->backlog + e->backlog_sent, e->backlog_len - e->backlog_sent);
        if (n < 0) return errno == EAGAIN ? 1 : -1;
        e->backlog_sent += (size_t)n;
    }
    free(e->backlog);
    e->backlog = NULL;
    e->backlog_len = e->backlog_sent = 0;
    return 0;
}

/* Read from `from` and write to its peer. Returns -1 on EOF or error. */
static int pass_on(struct end *from)
{
    struct end *to = from->peer;
    ssize_t n = read(from->fd, shared, sizeof shared);
    if (n == 0) return -1;
    if (n < 0) return errno == EAGAIN ? 0 : -1;
    ssize_t w = write(to->fd, shared, (size_t)n);
    if (w < 0 && errno != EAGAIN) return -1;
    if (w < 0) w = 0;
    if (w < n) {
        to->backlog_len = (size_t)(n - w);
        to->backlog_sent = 0;
        to->backlog = malloc(to->backlog_len);
        if (!to->backlog) return -1;
        memcpy(to->backlog, shared + w, to->backlog_len);
        set_events(from, from->events & ~(uint32_t)EPOLLIN);
        set_events(to, to->events | EPOLLOUT);
    }
    return 0;
}

static void on_event(struct end *e, uint32_t events)
{
    struct link *l = e->link;
    if (e->fd < 0) return;
    if (e == &l->target && !l->target_ready) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(e->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) { link_close(l); return; }
        l->target_ready = 1;
        set_events(&l->target, EPOLLIN);
        set_events(&l->client, EPOLLIN);
        return;
    }
    if (events & EPOLLOUT) {
        int r = drain(e);
        if (r < 0 || (r == 0 && l->closing)) { link_close(l); return; }
        if (r == 0) {
            set_events(e, e->events & ~(uint32_t)EPOLLOUT);
            set_events(e->peer, e->peer->events | EPOLLIN);
        }
    }
    if (!l->closing && (events & (EPOLLIN | EPOLLHUP | EPOLLERR)) && pass_on(e) < 0) {
        /* One side ended: the other still gets what it is owed, then both close. */
        if (e->peer->backlog && drain(e->peer) == 1) {
            l->closing = 1;
            set_events(e, 0);
            return;
        }
        link_close(l);
    }
}

static void accept_all(int lfd)
{
    int one = 1;
    for (;;) {
        int c = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (c < 0) return;
        int t = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        struct link *l = calloc(1, sizeof *l);
        if (t < 0 || !l) {
            close(c);
            if (t >= 0) close(t);
            free(l);
            continue;
        }
        setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        setsockopt(t, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (connect(t, (struct sockaddr *)&target_addr, sizeof target_addr) < 0 &&
            errno != EINPROGRESS) {
            close(c);
            close(t);
            free(l);
            continue;
        }
        /* The client is not read until the target's connect has finished. */
        l->client = (struct end){.fd = c, .link = l, .peer = &l->target, .events = 0};
        l->target = (struct end){.fd = t, .link = l, .peer = &l->client, .events = EPOLLOUT};
        struct epoll_event ce = {.events = 0, .data.ptr = &l->client};
        struct epoll_event te = {.events = EPOLLOUT, .data.ptr = &l->target};
        epoll_ctl(epfd, EPOLL_CTL_ADD, c, &ce);
        epoll_ctl(epfd, EPOLL_CTL_ADD, t, &te);
    }
}

static int ipv4(const char *text, int port, struct sockaddr_in *out)
{
    memset(out, 0, sizeof *out);
    out->sin_family = AF_INET;
    out->sin_port = htons((uint16_t)port);
    return port > 0 && port < 65536 && inet_pton(AF_INET, text, &out->sin_addr) == 1;
}

int main(int argc, char **argv)
{
    struct sockaddr_in listen_addr;
    if (argc < 3 || !ipv4(argc > 3 ? argv[3] : "127.0.0.1", atoi(argv[1]), &listen_addr) ||
        !ipv4(argc > 4 ? argv[4] : "127.0.0.1", atoi(argv[2]), &target_addr)) {
        fprintf(stderr, "usage: relay LISTEN_PORT TARGET_PORT [LISTEN_ADDR [TARGET_ADDR]]\n");
        return 1;
    }
    signal(SIGPIPE, SIG_IGN);
    struct rlimit lim;           /* two sockets per client: take all the hard limit allows */
    if (getrlimit(RLIMIT_NOFILE, &lim) == 0 && lim.rlim_cur < lim.rlim_max) {
        lim.rlim_cur = lim.rlim_max;
        setrlimit(RLIMIT_NOFILE, &lim);
    }
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0), one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (lfd < 0 || bind(lfd, (struct sockaddr *)&listen_addr, sizeof listen_addr) < 0 ||
        listen(lfd, 4096) < 0) {
        perror("relay: listen");
        return 1;
    }
    epfd = epoll_create1(EPOLL_CLOEXEC);
    listener.fd = lfd;
    struct epoll_event le = {.events = EPOLLIN, .data.ptr = &listener};
    epoll_ctl(epfd, EPOLL_CTL_ADD, lfd, &le);
    struct epoll_event events[256];
    for (;;) {
        int n = epoll_wait(epfd, events, 256, -1);
        if (n < 0 && errno != EINTR) { perror("relay: epoll_wait"); return 1; }
        for (int i = 0; i < n; i++) {
            struct end *e = events[i].data.ptr;
            if (e == &listener) accept_all(lfd);
            else on_event(e, events[i].events);
        }
        while (to_free) {
            struct link *l = to_free;
            to_free = l->next_free;
            free(l);
        }
    }
}
