// The daemon's engine as one import for its users (the HTTP API, blkback-server, tests):
// each part stays its own target, so the seams between them are the compiler's to keep.
@_exported import Blkif
@_exported import ControlPlane
@_exported import DataPlane
@_exported import Hypervisor
@_exported import VBDInterface
@_exported import Xenbus
