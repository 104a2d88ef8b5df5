/* Every Xen shim defines __XEN_TOOLS__ so the modules agree on the headers' view. */
#ifndef __XEN_TOOLS__
#define __XEN_TOOLS__ 1
#endif
#include <xenstore.h>
