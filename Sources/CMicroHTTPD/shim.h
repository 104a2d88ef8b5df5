#include <sys/types.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <stdarg.h>
#include <stdint.h>
#include <microhttpd.h>

static inline int blkback_hex_digit(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* Percent-decodes a URL path or query argument in place, like MHD's default, except that
 * "%00" stays as it is: a decoded NUL would cut the C string short, so "/healthz%00x"
 * would read as "/healthz". Returns the new length. */
static inline size_t blkback_mhd_unescape(void *cls, struct MHD_Connection *connection, char *text) {
    (void)cls;
    (void)connection;
    char *out = text;
    for (const char *in = text; *in != '\0'; in++) {
        int high, low;
        if (in[0] == '%' && (high = blkback_hex_digit(in[1])) >= 0 && (low = blkback_hex_digit(in[2])) >= 0
            && (high | low) != 0) {
            *out++ = (char)(high * 16 + low);
            in += 2;
        } else {
            *out++ = *in;
        }
    }
    *out = '\0';
    return (size_t)(out - text);
}

/* MHD_start_daemon is variadic, which Swift cannot call. This fixed-signature wrapper takes
 * the callbacks as typed parameters (the logger first, as MHD asks) and everything else as
 * an MHD_OPTION_ARRAY. */
static inline struct MHD_Daemon *blkback_mhd_start(unsigned int flags, uint16_t port,
                                                   MHD_LogCallback logger, void *logger_cls,
                                                   MHD_AccessHandlerCallback handler, void *handler_cls,
                                                   MHD_RequestCompletedCallback completed, void *completed_cls,
                                                   const struct MHD_OptionItem *options) {
    return MHD_start_daemon(flags, port, NULL, NULL, handler, handler_cls,
                            MHD_OPTION_EXTERNAL_LOGGER, logger, logger_cls,
                            MHD_OPTION_NOTIFY_COMPLETED, completed, completed_cls,
                            MHD_OPTION_UNESCAPE_CALLBACK, blkback_mhd_unescape, NULL,
                            MHD_OPTION_ARRAY, options,
                            MHD_OPTION_END);
}

/* MHD_get_connection_info is variadic: the connection's socket, or -1. */
static inline int blkback_mhd_connection_socket(struct MHD_Connection *connection) {
    const union MHD_ConnectionInfo *info = MHD_get_connection_info(connection, MHD_CONNECTION_INFO_CONNECTION_FD);
    return info != NULL ? info->connect_fd : -1;
}
