/* LD_PRELOAD shim: set TCP_NODELAY on every accepted socket. Used only to confirm that the
 * 40 ms single-client range latency comes from Nagle on the server's accepted sockets
 * (tonic ignores Server::tcp_nodelay with serve_with_incoming*). Build:
 *   cc -shared -fPIC -O2 -o /tmp/nodelay-shim.so bench/store/nodelay-shim.c -ldl */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

static void nodelay(int fd) {
    if (fd >= 0) { int one = 1; setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one); }
}
int accept4(int s, struct sockaddr *a, socklen_t *l, int f) {
    static int (*real)(int, struct sockaddr *, socklen_t *, int);
    if (!real) real = dlsym(RTLD_NEXT, "accept4");
    int fd = real(s, a, l, f);
    nodelay(fd);
    return fd;
}
int accept(int s, struct sockaddr *a, socklen_t *l) {
    static int (*real)(int, struct sockaddr *, socklen_t *);
    if (!real) real = dlsym(RTLD_NEXT, "accept");
    int fd = real(s, a, l);
    nodelay(fd);
    return fd;
}
