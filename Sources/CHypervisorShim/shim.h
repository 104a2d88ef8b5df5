/* Header-only helpers the simulated hypervisor needs and Swift cannot express directly:
 * atomics on memory shared with another process (grant entries, as Xen and Linux use
 * cmpxchg on them) and the CMSG macros for passing eventfds over a unix socket. */
#ifndef CHYPERVISOR_SHIM_H
#define CHYPERVISOR_SHIM_H
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/eventfd.h>
#include <sys/epoll.h>
#include <sys/file.h>
#include <pthread.h>
#include <errno.h>

/* Returns the value found; the exchange happened iff it equals `expected`. */
static inline uint32_t hv_cmpxchg32(uint32_t *p, uint32_t expected, uint32_t desired) {
    __atomic_compare_exchange_n(p, &expected, desired, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return expected;
}
static inline uint16_t hv_cmpxchg16(uint16_t *p, uint16_t expected, uint16_t desired) {
    __atomic_compare_exchange_n(p, &expected, desired, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return expected;
}
static inline uint16_t hv_load16(const uint16_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline uint32_t hv_load32(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void hv_store16_release(uint16_t *p, uint16_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline void hv_store32_relaxed(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
static inline void hv_store16_relaxed(uint16_t *p, uint16_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
/* Xen's gnttab_clear_flags: atomically clear bits of the shared flags word. */
static inline void hv_clear_bits16(uint16_t *p, uint16_t bits) { __atomic_fetch_and(p, (uint16_t)~bits, __ATOMIC_SEQ_CST); }
static inline void hv_wmb(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }

/* The simulated grant-table lock, in memory shared between processes: process-shared and
 * robust, so a holder that dies frees it for the next taker instead of hanging everyone.
 * Uncontended, taking and releasing it are atomics, no system call. */
static inline size_t hv_shared_lock_size(void) { return sizeof(pthread_mutex_t); }
static inline int hv_shared_lock_init(void *p) {
    pthread_mutexattr_t attributes;
    pthread_mutexattr_init(&attributes);
    pthread_mutexattr_setpshared(&attributes, PTHREAD_PROCESS_SHARED);
    pthread_mutexattr_setrobust(&attributes, PTHREAD_MUTEX_ROBUST);
    int result = pthread_mutex_init((pthread_mutex_t *)p, &attributes);
    pthread_mutexattr_destroy(&attributes);
    return result;
}
/* 0 once held; a holder that died leaves what it guarded as it was, as flock would. */
static inline int hv_shared_lock(void *p) {
    int result = pthread_mutex_lock((pthread_mutex_t *)p);
    if (result == EOWNERDEAD) result = pthread_mutex_consistent((pthread_mutex_t *)p);
    return result;
}
static inline void hv_shared_unlock(void *p) { pthread_mutex_unlock((pthread_mutex_t *)p); }
static inline void hv_store32_release(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline uint64_t hv_load64(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void hv_increment64(uint64_t *p) { __atomic_fetch_add(p, 1, __ATOMIC_RELEASE); }

/* Sends `len` bytes plus up to 4 descriptors in one SCM_RIGHTS message. */
static inline ssize_t hv_send_with_fds(int sock, const void *buf, size_t len, const int *fds, int nfds) {
    struct iovec iov = { .iov_base = (void *)buf, .iov_len = len };
    union { char buf[CMSG_SPACE(4 * sizeof(int))]; struct cmsghdr align; } control;
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    memset(&control, 0, sizeof control);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    if (nfds > 4) return -1;
    if (nfds > 0) {
        msg.msg_control = control.buf;
        msg.msg_controllen = CMSG_SPACE(nfds * sizeof(int));
        struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
        cmsg->cmsg_level = SOL_SOCKET;
        cmsg->cmsg_type = SCM_RIGHTS;
        cmsg->cmsg_len = CMSG_LEN(nfds * sizeof(int));
        memcpy(CMSG_DATA(cmsg), fds, nfds * sizeof(int));
    }
    return sendmsg(sock, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
}

/* Receives one message; descriptors land in fds (up to 4, close-on-exec), count in *nfds.
 * Descriptors beyond 4 or in a truncated message are closed, never leaked. */
static inline ssize_t hv_recv_with_fds(int sock, void *buf, size_t len, int *fds, int *nfds, int flags) {
    struct iovec iov = { .iov_base = buf, .iov_len = len };
    union { char buf[CMSG_SPACE(8 * sizeof(int))]; struct cmsghdr align; } control;
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.buf;
    msg.msg_controllen = sizeof control.buf;
    *nfds = 0;
    ssize_t n = recvmsg(sock, &msg, flags | MSG_CMSG_CLOEXEC);
    if (n < 0) return n;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        int count = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        int got[8];
        memcpy(got, CMSG_DATA(c), count * sizeof(int));
        for (int i = 0; i < count; i++) {
            if (*nfds < 4) fds[(*nfds)++] = got[i]; else close(got[i]);
        }
    }
    return n;
}
#endif
