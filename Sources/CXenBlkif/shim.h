/* Every Xen shim defines __XEN_TOOLS__ so the modules agree on the headers' view. */
#ifndef __XEN_TOOLS__
#define __XEN_TOOLS__ 1
#endif
/* ring.h wants the tools' barrier macros, which only xenctrl.h defines; the ring codec is
 * Swift, so these headers are used for their layouts and constants only. */
#ifndef xen_mb
#define xen_mb() __sync_synchronize()
#define xen_rmb() __sync_synchronize()
#define xen_wmb() __sync_synchronize()
#endif
#include <stdint.h>
#include <xen/xen.h>
#include <xen/grant_table.h>
#include <xen/io/ring.h>
#include <xen/io/blkif.h>
#include <xen/io/xenbus.h>
#include <xen/io/xs_wire.h>
#include <xen/io/protocols.h>
DEFINE_RING_TYPES(blkif_c, struct blkif_request, struct blkif_response);
