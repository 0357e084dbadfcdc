/*
 * imapload: the benchmarks' IMAP load generator. One thread, one epoll loop, a fixed
 * table of client slots, and no allocation per exchange (the latency list grows by
 * doubling), so that it costs a few microseconds per exchange and is not what limits a
 * run on a small machine.
 *
 *   imapload MODE [options]        (imapload --help lists the options)
 *
 * Modes:
 *   cycle  the webmail cycle, over and over on each of --clients slots: connect, read the
 *          greeting, LOGIN, SELECT, FETCH, LOGOUT, close; users rotate over --users
 *   bulk   log in once per slot, then FETCH --bulk (large messages) over and over
 *   noop   log in once per slot, then NOOP over and over: round-trip latency
 *   idle   open --sessions logged-in sessions (LOGIN, SELECT, then nothing), --clients
 *          of them opening at a time, hold them --hold seconds, then close them all
 *
 * With --json the result is one JSON object on stdout (benchmarks/perf.py reads it).
 * With --proxy-pid it also reports that process's CPU time during the run and its RSS
 * before, after the idle sessions opened, and at the end.
 *
 * Build: gcc -O2 -o imapload imapload.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum mode { CYCLE, BULK, NOOP, IDLE };
static const char *const MODE_NAMES[] = {"cycle", "bulk", "noop", "idle"};

/* What a slot waits for. */
enum step { UNUSED, CONNECTING, GREETING, LOGIN, SELECT, FETCH, LOGOUT, REPEAT, HELD };

static struct options {
    enum mode mode;
    const char *host;
    int port, clients, clients_given, user_low, user_high, sessions, proxy_pid, json;
    double seconds, warmup, hold, timeout;
    const char *user_fmt, *pass_fmt, *mailbox, *select_params, *fetch, *bulk;
} opt;

/* The reader keeps the first bytes of the current response line (enough for a tag and
 * its status word) and the last bytes of the current segment (enough for a literal's
 * "{12345}\r\n"); everything in between and inside literals is only counted. */
#define HEAD 40
#define TAIL 24

struct slot {
    int fd;
    enum step step;
    unsigned serial;         /* the next tag number on this connection */
    char tag[16];
    int taglen;
    int user;
    char head[HEAD];
    int headlen;
    char tail[TAIL];
    int taillen;
    int continued;           /* the line goes on after a literal */
    long long literal;       /* literal bytes still to skip */
    char out[320];
    int outlen, outdone;
    uint32_t events;
    uint64_t began, sent, last_io;   /* ns: cycle start, command sent, last progress */
    int counted;             /* idle: counted in `open_now` */
    unsigned connection;     /* bumped for each new connection made in this slot */
};

static struct slot *slots;
static int nslots, epfd;
static struct sockaddr_in server;
static uint64_t window_start, window_end;
static int keep_going = 1;
static unsigned users_handed;

/* results */
static uint64_t *latencies;
static size_t nlat, latcap;
static unsigned long long done_in_window, done_all, errors_in_window, errors_all;
static unsigned long long bytes_in_window, bytes_all;
static int open_now, open_failed, open_started;
static char last_error[200];

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int in_window(uint64_t t)
{
    return t >= window_start && t < window_end;
}

static void record_latency(uint64_t ns)
{
    if (nlat == latcap) {
        latcap = latcap ? 2 * latcap : 1 << 16;
        latencies = realloc(latencies, latcap * sizeof *latencies);
        if (!latencies) { perror("imapload: realloc"); exit(2); }
    }
    latencies[nlat++] = ns;
}

static void watch(struct slot *s, uint32_t events)
{
    if (s->events == events) return;
    struct epoll_event ev = {.events = events, .data.ptr = s};
    epoll_ctl(epfd, EPOLL_CTL_MOD, s->fd, &ev);
    s->events = events;
}

static void hang_up(struct slot *s)
{
    if (s->fd >= 0) close(s->fd);   /* close() also takes it out of the epoll set */
    s->fd = -1;
    s->step = UNUSED;
}

static void start(struct slot *s);

/* The connection failed at its current step: count it, remember why, and (except when
 * opening idle sessions) start over on a new connection. */
static void fail(struct slot *s, const char *why)
{
    int err = errno;
    snprintf(last_error, sizeof last_error, "%s at step %d%s%s", why, (int)s->step,
             err ? ": " : "", err ? strerror(err) : "");
    errors_all++;
    if (in_window(now_ns())) errors_in_window++;
    if (opt.mode == IDLE) {
        if (s->counted) open_now--;
        else open_failed++;
        s->counted = 0;
        hang_up(s);
        return;
    }
    hang_up(s);
    if (keep_going) start(s);
}

static void push_out(struct slot *s)
{
    while (s->outdone < s->outlen) {
        ssize_t n = write(s->fd, s->out + s->outdone, (size_t)(s->outlen - s->outdone));
        if (n < 0) {
            if (errno == EAGAIN) { watch(s, EPOLLIN | EPOLLOUT); return; }
            fail(s, "write failed");
            return;
        }
        s->outdone += (int)n;
    }
    watch(s, EPOLLIN);
}

static void command(struct slot *s, enum step next, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Send "<tag> <text>\r\n" and wait for that tag's reply in step `next`. */
static void command(struct slot *s, enum step next, const char *fmt, ...)
{
    va_list ap;
    s->taglen = snprintf(s->tag, sizeof s->tag, "L%u", ++s->serial);
    int n = snprintf(s->out, sizeof s->out, "%s ", s->tag);
    va_start(ap, fmt);
    n += vsnprintf(s->out + n, sizeof s->out - (size_t)n - 2, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof s->out - 2) n = (int)sizeof s->out - 2;
    memcpy(s->out + n, "\r\n", 2);
    s->outlen = n + 2;
    s->outdone = 0;
    s->step = next;
    s->sent = now_ns();
    push_out(s);
}

static void start(struct slot *s)
{
    s->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (s->fd < 0) { perror("imapload: socket"); exit(2); }
    int one = 1;
    setsockopt(s->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    s->serial = 0;
    s->taglen = s->headlen = s->taillen = s->continued = 0;
    s->literal = 0;
    s->outlen = s->outdone = 0;
    s->counted = 0;
    s->user = opt.user_low + (int)(users_handed++ % (unsigned)(opt.user_high - opt.user_low + 1));
    s->connection++;
    s->began = s->last_io = now_ns();
    s->step = CONNECTING;
    s->events = EPOLLOUT;
    struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = s};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, s->fd, &ev) < 0) { perror("imapload: epoll"); exit(2); }
    if (connect(s->fd, (struct sockaddr *)&server, sizeof server) < 0 && errno != EINPROGRESS)
        fail(s, "connect failed");
}

/* One complete response line arrived; `status` is the word after the tag (or after
 * "*" in the greeting). Move the slot on. */
static void on_reply(struct slot *s, const char *status)
{
    int ok = !strncmp(status, "OK", 2) || (s->step == GREETING && !strncmp(status, "PREAUTH", 7));
    uint64_t t = now_ns();
    errno = 0;
    if (!ok && s->step != LOGOUT) {
        char why[64];
        snprintf(why, sizeof why, "answer '%.10s'", status);
        fail(s, why);
        return;
    }
    char user[100], pass[100];
    switch (s->step) {
    case GREETING:
        snprintf(user, sizeof user, opt.user_fmt, s->user);
        snprintf(pass, sizeof pass, opt.pass_fmt, s->user);
        command(s, LOGIN, "LOGIN %s %s", user, pass);
        return;
    case LOGIN:
        command(s, SELECT, "SELECT \"%s\"%s%s", opt.mailbox,
                *opt.select_params ? " " : "", opt.select_params);
        return;
    case SELECT:
        if (opt.mode == CYCLE) command(s, FETCH, "FETCH %s", opt.fetch);
        else if (opt.mode == BULK) command(s, REPEAT, "FETCH %s", opt.bulk);
        else if (opt.mode == NOOP) command(s, REPEAT, "NOOP");
        else {
            s->step = HELD;
            s->counted = 1;
            open_now++;
        }
        return;
    case FETCH:
        command(s, LOGOUT, "LOGOUT");
        return;
    case LOGOUT:
        done_all++;
        if (in_window(t)) { done_in_window++; record_latency(t - s->began); }
        hang_up(s);
        if (keep_going) start(s);
        return;
    case REPEAT:
        done_all++;
        if (in_window(t)) { done_in_window++; record_latency(t - s->sent); }
        if (!keep_going) { hang_up(s); return; }
        if (opt.mode == BULK) command(s, REPEAT, "FETCH %s", opt.bulk);
        else command(s, REPEAT, "NOOP");
        return;
    default:
        return;
    }
}

/* A line ended (its last segment is in s->tail). Returns 1 when the slot moved on to
 * another connection or was closed, so that the rest of the buffer is not its. */
static int line_end(struct slot *s)
{
    char head[HEAD + 1];
    memcpy(head, s->head, (size_t)s->headlen);
    head[s->headlen] = 0;
    s->headlen = s->taillen = s->continued = 0;
    unsigned connection = s->connection;
    if (s->step == GREETING) {
        if (head[0] == '*' && head[1] == ' ') on_reply(s, head + 2);
    } else if (s->taglen && !strncmp(head, s->tag, (size_t)s->taglen) && head[s->taglen] == ' ') {
        on_reply(s, head + s->taglen + 1);
    }
    return s->connection != connection || s->step == UNUSED;
}

/* If the segment just ended with "{N}\r\n" or "{N+}\r\n", return N; else -1. */
static long long literal_size(const struct slot *s)
{
    int i = s->taillen - 3;     /* at the '}' before "\r\n" */
    if (i < 1 || s->tail[i] != '}' || s->tail[i + 1] != '\r') return -1;
    i--;
    if (s->tail[i] == '+') i--;
    int end = i;
    while (i >= 0 && s->tail[i] >= '0' && s->tail[i] <= '9') i--;
    if (i < 0 || s->tail[i] != '{' || i == end) return -1;
    return strtoll(s->tail + i + 1, NULL, 10);
}

static void take(struct slot *s, const char *data, size_t n)
{
    size_t at = 0;
    while (at < n) {
        if (s->literal > 0) {
            size_t skip = (size_t)s->literal < n - at ? (size_t)s->literal : n - at;
            s->literal -= (long long)skip;
            at += skip;
            continue;
        }
        const char *nl = memchr(data + at, '\n', n - at);
        size_t end = nl ? (size_t)(nl - data) + 1 : n, len = end - at;
        if (!s->continued && s->headlen < HEAD) {
            size_t room = (size_t)(HEAD - s->headlen), k = len < room ? len : room;
            memcpy(s->head + s->headlen, data + at, k);
            s->headlen += (int)k;
        }
        if (len >= TAIL) {
            memcpy(s->tail, data + end - TAIL, TAIL);
            s->taillen = TAIL;
        } else {
            int keep = TAIL - (int)len < s->taillen ? TAIL - (int)len : s->taillen;
            memmove(s->tail, s->tail + s->taillen - keep, (size_t)keep);
            memcpy(s->tail + keep, data + at, len);
            s->taillen = keep + (int)len;
        }
        at = end;
        if (!nl) return;
        long long size = literal_size(s);
        if (size >= 0) {
            s->literal = size;
            s->continued = 1;
            s->taillen = 0;
            continue;
        }
        if (line_end(s)) return;
    }
}

static char inbuf[256 * 1024];

static void on_event(struct slot *s, uint32_t events)
{
    s->last_io = now_ns();
    if (s->step == CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) { errno = err; fail(s, "connect failed"); return; }
        s->step = GREETING;
        watch(s, EPOLLIN);
        return;
    }
    unsigned connection = s->connection;
    if (s->outdone < s->outlen && (events & EPOLLOUT)) {
        push_out(s);
        if (s->connection != connection || s->fd < 0) return;
    }
    if (!(events & (EPOLLIN | EPOLLHUP | EPOLLERR))) return;
    for (int reads = 0; reads < 8 && s->connection == connection && s->fd >= 0; reads++) {
        ssize_t n = read(s->fd, inbuf, sizeof inbuf);
        if (n < 0 && errno == EAGAIN) return;
        if (n <= 0) {
            if (n == 0 && s->step == LOGOUT) { on_reply(s, "OK"); return; }  /* BYE, then close */
            if (n == 0) errno = 0;
            fail(s, n == 0 ? "connection closed" : "read failed");
            return;
        }
        bytes_all += (unsigned long long)n;
        if (in_window(now_ns())) bytes_in_window += (unsigned long long)n;
        take(s, inbuf, (size_t)n);
        if ((size_t)n < sizeof inbuf) return;
    }
}

/* Run the loop until `until` (ns), or, with `all_open`, until every idle session has
 * opened or failed. Slots that made no progress for --timeout seconds fail. */
static void run(uint64_t until, int all_open)
{
    struct epoll_event events[512];
    uint64_t stall = (uint64_t)(opt.timeout * 1e9), checked = now_ns();
    while (now_ns() < until) {
        if (all_open && open_now + open_failed >= open_started) return;
        int n = epoll_wait(epfd, events, 512, 10);
        for (int i = 0; i < n; i++) on_event(events[i].data.ptr, events[i].events);
        uint64_t t = now_ns();
        if (t - checked < 250000000u) continue;
        checked = t;
        for (int i = 0; i < nslots; i++) {
            struct slot *s = &slots[i];
            if (s->step != UNUSED && s->step != HELD && t - s->last_io > stall) {
                errno = ETIMEDOUT;
                fail(s, "no answer");
            }
        }
    }
}

/* ---- readings from /proc ---- */

/* CPU seconds (user + system, all threads) of `pid`, or -1. */
static double process_cpu(int pid)
{
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    char *p = strrchr(buf, ')');   /* the command name may hold spaces */
    unsigned long long utime = 0, stime = 0;
    if (!p || sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu",
                     &utime, &stime) != 2)
        return -1;
    return (double)(utime + stime) / (double)sysconf(_SC_CLK_TCK);
}

/* Resident set size of `pid` in kB, or -1. */
static long process_rss(int pid)
{
    char path[64], line[128];
    long kb = -1;
    snprintf(path, sizeof path, "/proc/%d/status", pid);
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "VmRSS: %ld", &kb) == 1) break;
    fclose(f);
    return kb;
}

/* All CPUs' busy and total jiffies so far, from /proc/stat. */
static void machine_cpu(double *busy, double *total)
{
    unsigned long long v[8] = {0};
    FILE *f = fopen("/proc/stat", "r");
    if (f) {
        if (fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2],
                   &v[3], &v[4], &v[5], &v[6], &v[7]) != 8)
            memset(v, 0, sizeof v);
        fclose(f);
    }
    *total = 0;
    for (int i = 0; i < 8; i++) *total += (double)v[i];
    *busy = *total - (double)v[3] - (double)v[4];   /* less idle and iowait */
}

static double own_cpu(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 +
           (double)ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

static int by_value(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* The p-th percentile of the sorted latencies, in microseconds (0 when none). */
static double percentile(double p)
{
    if (!nlat) return 0;
    return (double)latencies[(size_t)(p / 100 * (double)(nlat - 1) + 0.5)] / 1e3;
}

static void usage(FILE *to, int status)
{
    fprintf(to,
        "usage: imapload cycle|bulk|noop|idle [options]\n"
        "  --host ADDR         IPv4 address of the server (127.0.0.1)\n"
        "  --port N            its port (143)\n"
        "  --clients N         concurrent slots; idle: sessions opening at a time (1; idle 50)\n"
        "  --seconds S         measured seconds (10)\n"
        "  --warmup S          seconds before measuring (1)\n"
        "  --users A-B         user numbers, rotating (1-20)\n"
        "  --user-fmt F        user name, printf of the number (user%%d)\n"
        "  --pass-fmt F        password, printf of the number (secret%%d)\n"
        "  --mailbox NAME      mailbox to SELECT (INBOX)\n"
        "  --select-params P   after the mailbox name, e.g. '(CONDSTORE)' (none)\n"
        "  --fetch ARGS        cycle's FETCH arguments ('1:10 (FLAGS ENVELOPE)')\n"
        "  --bulk ARGS         bulk's FETCH arguments ('56:57 BODY.PEEK[]')\n"
        "  --sessions N        idle: sessions to open (1000)\n"
        "  --hold S            idle: seconds to hold them once open (2)\n"
        "  --timeout S         a slot that gets no answer for S seconds fails (30)\n"
        "  --proxy-pid PID     report the CPU time and RSS of this process\n"
        "  --json              print one JSON object\n");
    exit(status);
}

static void parse(int argc, char **argv)
{
    static const struct option longs[] = {
        {"host", 1, 0, 'h'}, {"port", 1, 0, 'p'}, {"clients", 1, 0, 'c'},
        {"seconds", 1, 0, 's'}, {"warmup", 1, 0, 'w'}, {"users", 1, 0, 'u'},
        {"user-fmt", 1, 0, 'U'}, {"pass-fmt", 1, 0, 'P'}, {"mailbox", 1, 0, 'm'},
        {"select-params", 1, 0, 'S'},
        {"fetch", 1, 0, 'f'}, {"bulk", 1, 0, 'b'}, {"sessions", 1, 0, 'k'},
        {"hold", 1, 0, 'H'}, {"timeout", 1, 0, 't'}, {"proxy-pid", 1, 0, 'x'},
        {"json", 0, 0, 'j'}, {"help", 0, 0, '?'}, {0, 0, 0, 0}};
    if (argc < 2) usage(stderr, 1);
    if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) usage(stdout, 0);
    int found = 0;
    for (int i = 0; i < 4; i++)
        if (!strcmp(argv[1], MODE_NAMES[i])) { opt.mode = (enum mode)i; found = 1; }
    if (!found) usage(stderr, 1);
    opt.host = "127.0.0.1";
    opt.port = 143;
    opt.clients = 1;
    opt.seconds = 10;
    opt.warmup = 1;
    opt.user_low = 1;
    opt.user_high = 20;
    opt.user_fmt = "user%d";
    opt.pass_fmt = "secret%d";
    opt.mailbox = "INBOX";
    opt.select_params = "";
    opt.fetch = "1:10 (FLAGS ENVELOPE)";
    opt.bulk = "56:57 BODY.PEEK[]";
    opt.sessions = 1000;
    opt.hold = 2;
    opt.timeout = 30;
    optind = 2;
    int c;
    while ((c = getopt_long(argc, argv, "", longs, NULL)) != -1) {
        switch (c) {
        case 'h': opt.host = optarg; break;
        case 'p': opt.port = atoi(optarg); break;
        case 'c': opt.clients = atoi(optarg); opt.clients_given = 1; break;
        case 's': opt.seconds = atof(optarg); break;
        case 'w': opt.warmup = atof(optarg); break;
        case 'u':
            if (sscanf(optarg, "%d-%d", &opt.user_low, &opt.user_high) != 2)
                opt.user_high = opt.user_low = atoi(optarg);
            break;
        case 'U': opt.user_fmt = optarg; break;
        case 'P': opt.pass_fmt = optarg; break;
        case 'm': opt.mailbox = optarg; break;
        case 'S': opt.select_params = optarg; break;
        case 'f': opt.fetch = optarg; break;
        case 'b': opt.bulk = optarg; break;
        case 'k': opt.sessions = atoi(optarg); break;
        case 'H': opt.hold = atof(optarg); break;
        case 't': opt.timeout = atof(optarg); break;
        case 'x': opt.proxy_pid = atoi(optarg); break;
        case 'j': opt.json = 1; break;
        case '?': usage(stdout, 0); break;
        default: usage(stderr, 1);
        }
    }
    if (opt.clients < 1 || opt.sessions < 1 || opt.user_high < opt.user_low ||
        opt.seconds <= 0) {
        fprintf(stderr, "imapload: --clients, --sessions and --seconds must be positive, "
                        "--users A-B with A <= B\n");
        exit(1);
    }
    if (opt.mode == IDLE && !opt.clients_given) opt.clients = 50;
}

/* The JSON string `s`, with quotes and backslashes made harmless. */
static void json_string(const char *s)
{
    putchar('"');
    for (; *s; s++) putchar(*s == '"' || *s == '\\' || (unsigned char)*s < 32 ? '\'' : *s);
    putchar('"');
}

int main(int argc, char **argv)
{
    parse(argc, argv);
    signal(SIGPIPE, SIG_IGN);
    struct rlimit lim;                 /* idle mode may hold thousands of sockets */
    if (getrlimit(RLIMIT_NOFILE, &lim) == 0 && lim.rlim_cur < lim.rlim_max) {
        lim.rlim_cur = lim.rlim_max;
        setrlimit(RLIMIT_NOFILE, &lim);
    }
    server.sin_family = AF_INET;
    server.sin_port = htons((uint16_t)opt.port);
    if (inet_pton(AF_INET, opt.host, &server.sin_addr) != 1) {
        fprintf(stderr, "imapload: --host must be an IPv4 address: %s\n", opt.host);
        return 1;
    }
    epfd = epoll_create1(EPOLL_CLOEXEC);
    nslots = opt.mode == IDLE ? opt.sessions : opt.clients;
    slots = calloc((size_t)nslots, sizeof *slots);
    if (!slots) { perror("imapload: calloc"); return 2; }
    for (int i = 0; i < nslots; i++) slots[i].fd = -1;

    double busy0, total0, busy1, total1, cpu0 = own_cpu();
    double proxy_cpu0 = opt.proxy_pid ? process_cpu(opt.proxy_pid) : 0;
    long rss[3] = {-1, -1, -1};
    if (opt.proxy_pid) rss[0] = rss[1] = process_rss(opt.proxy_pid);
    machine_cpu(&busy0, &total0);
    uint64_t t0 = now_ns();
    double open_s = 0;

    if (opt.mode == IDLE) {
        /* No measuring window: every error counts in both totals. */
        window_start = 0;
        window_end = UINT64_MAX;
        uint64_t give_up = t0 + (uint64_t)((opt.timeout + 60) * 1e9);
        while (open_started < opt.sessions && now_ns() < give_up) {
            while (open_started < opt.sessions &&
                   open_started - open_now - open_failed < opt.clients)
                start(&slots[open_started++]);
            run(now_ns() + 2000000u, 0);
        }
        run(give_up, 1);
        open_s = (double)(now_ns() - t0) / 1e9;
        usleep(200000);                   /* let the proxy settle before reading RSS */
        if (opt.proxy_pid) rss[1] = process_rss(opt.proxy_pid);
        run(now_ns() + (uint64_t)(opt.hold * 1e9), 0);
        keep_going = 0;
        for (int i = 0; i < nslots; i++) hang_up(&slots[i]);
    } else {
        window_start = t0 + (uint64_t)(opt.warmup * 1e9);
        window_end = window_start + (uint64_t)(opt.seconds * 1e9);
        for (int i = 0; i < nslots; i++) start(&slots[i]);
        run(window_end, 0);
        /* Let the cycles under way finish (up to 2 s), so that the server sees LOGOUTs
         * rather than dropped connections. */
        keep_going = 0;
        uint64_t drain = now_ns() + 2000000000u;
        for (;;) {
            int busy = 0;
            for (int i = 0; i < nslots; i++) busy += slots[i].step != UNUSED;
            if (!busy || now_ns() > drain) break;
            run(now_ns() + 10000000u, 0);
        }
        for (int i = 0; i < nslots; i++) hang_up(&slots[i]);
    }
    double wall = (double)(now_ns() - t0) / 1e9, cpu = own_cpu() - cpu0;
    double proxy_cpu = opt.proxy_pid ? process_cpu(opt.proxy_pid) - proxy_cpu0 : 0;
    if (opt.proxy_pid) rss[2] = process_rss(opt.proxy_pid);
    machine_cpu(&busy1, &total1);
    double machine_busy = total1 > total0 ? (busy1 - busy0) / (total1 - total0) : 0;
    qsort(latencies, nlat, sizeof *latencies, by_value);
    double rate = (double)done_in_window / opt.seconds;
    double mb_per_s = (double)bytes_in_window / opt.seconds / 1e6;

    if (opt.json) {
        printf("{\"scenario\": \"%s\", \"host\": \"%s\", \"port\": %d, \"clients\": %d, "
               "\"seconds\": %g, \"done\": %llu, \"done_all\": %llu, \"errors\": %llu, "
               "\"errors_all\": %llu, \"rate\": %.2f, \"p50_us\": %.1f, \"p90_us\": %.1f, "
               "\"p99_us\": %.1f, \"max_us\": %.1f, \"bytes\": %llu, \"bytes_all\": %llu, "
               "\"mb_per_s\": %.2f, \"loadgen_cpu_s\": %.3f, \"wall_s\": %.3f, "
               "\"sys_busy\": %.3f, \"proxy_cpu_s\": %.3f, "
               "\"proxy_rss_kb\": [%ld, %ld, %ld], \"sessions\": %d, \"sessions_open\": %d, "
               "\"sessions_failed\": %d, \"open_s\": %.3f, \"last_error\": ",
               MODE_NAMES[opt.mode], opt.host, opt.port, opt.clients, opt.seconds,
               done_in_window, done_all, errors_in_window, errors_all, rate,
               percentile(50), percentile(90), percentile(99), percentile(100),
               bytes_in_window, bytes_all, mb_per_s, cpu, wall, machine_busy, proxy_cpu,
               rss[0], rss[1], rss[2], opt.mode == IDLE ? opt.sessions : 0,
               opt.mode == IDLE ? open_now : 0, open_failed, open_s);
        json_string(last_error);
        printf("}\n");
        return 0;
    }
    printf("imapload %s against %s:%d\n", MODE_NAMES[opt.mode], opt.host, opt.port);
    if (opt.mode == IDLE) {
        printf("  sessions open %d of %d (%d failed) in %.1f s\n", open_now, opt.sessions,
               open_failed, open_s);
        if (opt.proxy_pid && open_now)
            printf("  proxy RSS %ld -> %ld kB: %.1f kB per session\n", rss[0], rss[1],
                   (double)(rss[1] - rss[0]) / open_now);
    } else {
        printf("  %d client(s), %.1f s measured: %llu done, %.1f per second\n", opt.clients,
               opt.seconds, done_in_window, rate);
        printf("  latency p50 %.1f us, p90 %.1f us, p99 %.1f us, max %.1f us\n",
               percentile(50), percentile(90), percentile(99), percentile(100));
        if (opt.mode == BULK) printf("  %.1f MB/s received\n", mb_per_s);
        if (opt.proxy_pid && done_all)
            printf("  proxy CPU %.2f s: %.1f us per operation\n", proxy_cpu,
                   proxy_cpu * 1e6 / (double)done_all);
    }
    printf("  errors %llu (%llu in all)%s%s\n", errors_in_window, errors_all,
           last_error[0] ? ", last: " : "", last_error);
    printf("  imapload used %.2f s of CPU in %.1f s; the machine was %.0f%% busy\n", cpu,
           wall, 100 * machine_busy);
    return 0;
}
