/* librados and librbd (Ceph) through their C headers; neither ships a pkg-config file. */
#include <features.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>
#include <rados/librados.h>
#include <rbd/librbd.h>
