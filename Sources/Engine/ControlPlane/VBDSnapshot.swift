import VBDInterface
import Xenbus

/// The vdisk `info` bits of blkif.h.
public struct VDiskInfo: OptionSet, Sendable, Hashable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    public static let cdrom = VDiskInfo(rawValue: 1)
    public static let removable = VDiskInfo(rawValue: 2)
    public static let readOnly = VDiskInfo(rawValue: 4)
}

/// A consistent copy of one VBD's state, for the HTTP API and metrics.
public struct VBDSnapshot: Sendable, Equatable {
    public var identity: VBDIdentity
    public var backendPath: String
    /// Empty until the backend's `frontend` key has been read.
    public var frontendPath: String
    public var backendState: XenbusState
    /// nil while the frontend's state node holds something outside xenbus.h.
    public var frontendState: XenbusState?
    /// "r" or "w" (from the backend's mode key).
    public var mode: String
    /// The backing store's path once open (params or the device node); else what was asked for.
    public var target: String
    public var sectors: UInt64
    public var sectorSize: UInt32
    public var physicalSectorSize: UInt32
    public var info: VDiskInfo
    /// protocol name; nil until the frontend's ring description was read.
    public var `protocol`: String?
    public var queues: Int
    public var ringPageOrder: Int
    public var persistentGrants: Bool
    public var maxIndirectSegments: Int
    public var features: BlockFeatures
    /// How the rings' I/O is served; nil while not connected.
    public var ioMode: IOMode?
    /// The QoS limits in force (or to be, once connected).
    public var qos: QoSLimits
    /// Data-path counters since connect; nil while not connected.
    public var statistics: VBDStatistics?
    /// The last xenbus_dev_fatal line ("<errno> <message>"), if any.
    public var error: String?

    public var kind: String { identity.kind }
    /// The frontend's domain.
    public var domid: UInt32 { identity.domid.rawValue }
    /// The virtual device number.
    public var devid: UInt32 { identity.devid }
}
