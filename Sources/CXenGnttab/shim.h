/* Every Xen shim defines __XEN_TOOLS__ so the modules agree on the headers' view. */
#ifndef __XEN_TOOLS__
#define __XEN_TOOLS__ 1
#endif
#include <stdint.h>
#include <stddef.h>
#include <xengnttab.h>
/* GNTTABOP_copy's flag bits and success status (xen/grant_table.h, a fixed ABI); that header
 * belongs to CXenBlkif, and one C header in two modules is a redefinition. */
enum {
    BLKBACK_GNTCOPY_SOURCE_GREF = 1 << 0,
    BLKBACK_GNTCOPY_DEST_GREF = 1 << 1,
    BLKBACK_GNTST_OKAY = 0,
};
