import Blkif
/// Block operations the data plane serves on a connected device; published at connect
/// (feature-flush-cache, feature-barrier, feature-discard).
public struct BlockFeatures: Equatable, Sendable {
    public var flush: Bool
    public var barrier: Bool
    public var discard: Bool
    /// discard-granularity / discard-alignment in bytes, discard-secure.
    public var discardGranularity: UInt32
    public var discardAlignment: UInt32
    public var discardSecure: Bool
    /// The data plane keeps grants mapped across requests (feature-persistent agreed).
    public var persistentGrants: Bool

    public init(flush: Bool = false, barrier: Bool = false, discard: Bool = false,
                discardGranularity: UInt32 = 0, discardAlignment: UInt32 = 0, discardSecure: Bool = false,
                persistentGrants: Bool = false) {
        self.flush = flush
        self.barrier = barrier
        self.discard = discard
        self.discardGranularity = discardGranularity
        self.discardAlignment = discardAlignment
        self.discardSecure = discardSecure
        self.persistentGrants = persistentGrants
    }

    public static let none = BlockFeatures()
}

/// What the data plane learned of a backing store by doing I/O on it (whether it takes
/// direct I/O, whether its file system punches holes): learned once per opened store, off the
/// control-plane thread, and kept for every connect of the device.
public protocol PreparedStore: AnyObject, Sendable {}

/// Everything the data plane needs to serve one VBD's rings.
public struct DataPlaneRequest: Sendable {
    public var vbd: VBDIdentity
    public var backingStore: BackingStore
    /// `DataPlane.prepare` of `backingStore`.
    public var prepared: any PreparedStore
    public var rings: RingDescription
    public var maxIndirectSegments: Int
    /// The backend's discard-enable (0 = the toolstack forbids discard).
    public var discardEnabled: Bool
    /// Grants each ring may keep mapped when feature-persistent was agreed.
    public var maxPersistentGrants: Int
    /// Take over rings a previous daemon served (the device stayed Connected), from their
    /// journals; otherwise start them afresh.
    public var resume: Bool
    /// The limits in force from the start (the backend's qos-* keys).
    public var qos: QoSLimits
    /// The size to serve when it differs from the store's at open (resized since); nil: the store's.
    public var sectors: UInt64?
    /// Where the rings report a halt and error responses (the API's event stream).
    public var events: VBDEventReporter

    public init(vbd: VBDIdentity, backingStore: BackingStore, prepared: any PreparedStore, rings: RingDescription,
                maxIndirectSegments: Int, discardEnabled: Bool, maxPersistentGrants: Int, resume: Bool = false,
                qos: QoSLimits = .none) {
        self.prepared = prepared
        self.resume = resume
        self.qos = qos
        self.vbd = vbd
        self.events = VBDEventReporter(vbd: vbd, log: nil)
        self.backingStore = backingStore
        self.rings = rings
        self.maxIndirectSegments = maxIndirectSegments
        self.discardEnabled = discardEnabled
        self.maxPersistentGrants = maxPersistentGrants
    }
}

/// How a VBD's rings move guest data (the API's io_mode).
public enum IOMode: String, Sendable, Equatable {
    /// Direct I/O on the guest's pages, kept mapped across requests (feature-persistent).
    case directPersistent = "direct-persistent"
    /// Direct I/O on the guest's pages, mapped for each request.
    case directMap = "direct-map"
    /// Direct I/O on daemon buffers, the guest's pages copied by the hypervisor (GNTTABOP_copy).
    case directCopy = "direct-copy"
    /// Through dom0's page cache, on pages mapped for each request or kept mapped.
    case buffered
    /// To a network store (NBD) from daemon memory, the guest's pages copied by the hypervisor.
    case copy
}

/// The data plane seen from the control plane: maps a frontend's rings and serves them.
/// Called only from the control-plane thread, but for `prepare`.
public protocol DataPlane: AnyObject, Sendable {
    /// Tries the store's I/O paths. May block as long as the store's file system takes to
    /// answer (a slow disk, a remote file system): call it from a thread of its own.
    func prepare(_ store: BackingStore) throws -> any PreparedStore
    /// Maps the rings' grants, binds their event channels and starts serving
    /// (xen_blkif_map + the xenblkd threads). Throws with one line when any of it fails;
    /// nothing stays mapped then.
    func connect(_ request: DataPlaneRequest) throws -> any ConnectedRings
    /// Who held the VBD's store lock (an RBD image's exclusive lock) for the daemon that last
    /// served it from this state directory: kept beside the rings' journals while its rings
    /// are served or handed over, so a successor after a crash knows whose lock to break.
    func recordedLockHolder(of vbd: VBDIdentity) -> String?
}

/// One VBD's rings while the data plane serves them.
public protocol ConnectedRings: AnyObject, Sendable {
    /// What the data plane serves on this backing store, to advertise at connect.
    var features: BlockFeatures { get }
    /// How the rings' I/O is served.
    var ioMode: IOMode { get }
    /// The QoS limits in force. Safe from any thread.
    var qos: QoSLimits { get }
    /// Changes the QoS limits; the next request the rings take is measured against them.
    func setQoS(_ limits: QoSLimits)
    /// The device's new size (an online resize): requests are checked against it from now.
    func resize(sectors: UInt64)
    /// Data-path counters since connect, summed over the rings. Safe from any thread.
    var statistics: VBDStatistics { get }
    /// Why a ring stopped being served (the first one that did); nil while all are served.
    /// Safe from any thread.
    var haltReason: String? { get }
    /// Stops taking requests and releases the rings once nothing is in flight
    /// (xen_blkif_disconnect). false = requests still in flight; call again later.
    func disconnect() -> Bool
    /// The same for a planned restart: the rings stay as the guest sees them (Connected) and
    /// their journals stay, so that the next daemon takes them over. false = still in flight.
    func handOver() -> Bool
}
