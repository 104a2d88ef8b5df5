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
