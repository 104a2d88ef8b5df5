/* liburing.h sets _XOPEN_SOURCE itself; pulling <features.h> in first keeps fd_set and
 * friends identical across modules (docs/architecture.md, "C libraries from Swift"). */
#include <features.h>
#include <fcntl.h>
#include <liburing.h>
#include <sys/eventfd.h>
#include <linux/falloc.h>
/* O_DIRECT hides behind _GNU_SOURCE, which would change fd_set again; spell it per arch. */
static inline int curing_o_direct(void) {
#if defined(__aarch64__) || defined(__arm__)
    return 0200000;
#else
    return 040000;
#endif
}
/* io_uring_enable_rings is not exported by Debian 12's liburing 2.3: the register call it
 * wraps. The ring's owner thread calls it, so that thread becomes the single issuer. */
#include <errno.h>
#include <sys/syscall.h>
long syscall(long number, ...);
static inline int curing_enable_rings(struct io_uring *ring) {
    long status = syscall(__NR_io_uring_register, ring->ring_fd, IORING_REGISTER_ENABLE_RINGS, (void *)0, 0);
    return status < 0 ? -errno : 0;
}
/* The tag an entry carries (liburing 2.3 has no getter for a submission entry). */
static inline unsigned long long curing_sqe_tag(const struct io_uring_sqe *sqe) {
    return sqe->user_data;
}
/* Completions posted, or task work the kernel holds until the ring's thread enters it
 * (IORING_SQ_TASKRUN, set with IORING_SETUP_TASKRUN_FLAG): what a polling thread looks for. */
static inline int curing_has_work(struct io_uring *ring) {
    unsigned flags = __atomic_load_n(ring->sq.kflags, __ATOMIC_ACQUIRE);
    return (flags & IORING_SQ_TASKRUN) != 0 || io_uring_cq_ready(ring) > 0;
}
