/* libnbd's asynchronous calls take a completion closure by value; the data plane retires
 * commands itself (nbd_aio_peek_command_completed), so these pass none. */
#include <features.h>
#include <stddef.h>
#include <stdint.h>
#include <libnbd.h>

static inline int64_t cnbd_aio_pread(struct nbd_handle *h, void *buffer, size_t count, uint64_t offset) {
    return nbd_aio_pread(h, buffer, count, offset, NBD_NULL_COMPLETION, 0);
}
static inline int64_t cnbd_aio_pwrite(struct nbd_handle *h, const void *buffer, size_t count, uint64_t offset) {
    return nbd_aio_pwrite(h, buffer, count, offset, NBD_NULL_COMPLETION, 0);
}
static inline int64_t cnbd_aio_flush(struct nbd_handle *h) {
    return nbd_aio_flush(h, NBD_NULL_COMPLETION, 0);
}
static inline int64_t cnbd_aio_trim(struct nbd_handle *h, uint64_t count, uint64_t offset) {
    return nbd_aio_trim(h, count, offset, NBD_NULL_COMPLETION, 0);
}
