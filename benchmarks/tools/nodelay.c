/*
 * nodelay.so - an LD_PRELOAD library: every TCP socket the program accepts or connects
 * gets TCP_NODELAY.
 *
 * Debian's up-imapproxy writes many of its replies in two write() calls and never turns
 * Nagle's algorithm off, so the second segment waits for the client's delayed ACK (about
 * 40 ms). benchmarks/perf.py starts it with this library preloaded as well as without,
 * to compare the proxy with the C proxy at its best. Built by perf.py with
 *   gcc -O2 -shared -fPIC -o nodelay.so nodelay.c -ldl
 * and used as LD_PRELOAD=nodelay.so imapproxyd -f imapproxy.conf.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

typedef int (*accept_fn)(int, struct sockaddr *, socklen_t *);
typedef int (*accept4_fn)(int, struct sockaddr *, socklen_t *, int);
typedef int (*connect_fn)(int, const struct sockaddr *, socklen_t);

/* TCP_NODELAY on `fd` if it is a TCP socket; errno is left as the caller's call set it. */
static void set_nodelay(int fd)
{
    int saved = errno, on = 1, type = 0, domain = 0;
    socklen_t len = sizeof type;
    if (fd < 0 || getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) != 0 || type != SOCK_STREAM)
        goto out;
    len = sizeof domain;
    if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len) != 0 ||
        (domain != AF_INET && domain != AF_INET6))
        goto out;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on);
out:
    errno = saved;
}

int accept(int fd, struct sockaddr *addr, socklen_t *len)
{
    static accept_fn next;
    if (!next) next = (accept_fn)dlsym(RTLD_NEXT, "accept");
    int conn = next(fd, addr, len);
    set_nodelay(conn);
    return conn;
}

int accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags)
{
    static accept4_fn next;
    if (!next) next = (accept4_fn)dlsym(RTLD_NEXT, "accept4");
    int conn = next(fd, addr, len, flags);
    set_nodelay(conn);
    return conn;
}

/* Set before connecting, so that the first request after the handshake goes out alone. */
int connect(int fd, const struct sockaddr *addr, socklen_t len)
{
    static connect_fn next;
    if (!next) next = (connect_fn)dlsym(RTLD_NEXT, "connect");
    set_nodelay(fd);
    return next(fd, addr, len);
}
