import Blkif
import VBDInterface
import Xenbus

/// What this backend advertises and serves; fixed for the daemon's lifetime.
public struct BackendConfiguration: Sendable, Equatable {
    /// Highest ring-page-order a frontend may ask for: XENBUS_MAX_RING_GRANT_ORDER (16 pages).
    public static let ringPageOrderLimit = 4
    /// BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST (8) pages of 512 segments each.
    public static let indirectSegmentLimit = 8 * 512

    /// The domain this backend runs in (its xenstore home is /local/domain/<domid>).
    public var domid: UInt32
    /// The backend/<kind> trees served (vbd, vbd3, qdisk, ...).
    public var kinds: [String]
    /// multi-queue-max-queues.
    public var maxQueues: Int
    /// max-ring-page-order.
    public var maxRingPageOrder: Int
    /// feature-max-indirect-segments; 0 advertises no indirect descriptors.
    public var maxIndirectSegments: Int
    /// feature-persistent offered to frontends.
    public var persistentGrants: Bool
    /// Grants each ring keeps mapped at most with feature-persistent (Linux blkback's
    /// max_persistent_grants, default 1056); requests past it map their pages for themselves.
    public var maxPersistentGrants: Int
    /// Seconds a network store (NBD, RBD) has to answer when a device is opened.
    public var storeConnectTimeout: Double
    /// Seconds an RBD image's commands wait on its cluster before they fail (librados'
    /// operation timeouts, set when the image is opened; 0 waits forever). The data plane
    /// keeps the same bound for NBD.
    public var storeRetryTimeout: Double

    /// Linux blkback's default max_persistent_grants.
    public static let defaultMaxPersistentGrants = 1056
    /// Beyond this a ring could pin more of dom0's grant mappings than a ring can use at once.
    public static let persistentGrantLimit = 65536

    public init(domid: UInt32 = 0, kinds: [String] = ["vbd"], maxQueues: Int = 4, maxRingPageOrder: Int = 4,
                maxIndirectSegments: Int = 256, persistentGrants: Bool = true,
                maxPersistentGrants: Int = BackendConfiguration.defaultMaxPersistentGrants,
                storeConnectTimeout: Double = 10, storeRetryTimeout: Double = 60) {
        self.storeConnectTimeout = storeConnectTimeout
        self.storeRetryTimeout = storeRetryTimeout
        self.domid = domid
        self.kinds = kinds
        self.maxQueues = maxQueues
        self.maxRingPageOrder = maxRingPageOrder
        self.maxIndirectSegments = maxIndirectSegments
        self.persistentGrants = persistentGrants
        self.maxPersistentGrants = maxPersistentGrants
    }

    /// One line naming the first setting outside what blkif allows, or nil when all are valid.
    public var validationError: String? {
        if kinds.isEmpty { return "at least one --kind is needed" }
        if let bad = kinds.first(where: { !BackendConfiguration.isValidKind($0) }) {
            return "kind '\(bad)' is not a xenstore path element (letters, digits, '-', '_')"
        }
        if maxQueues < 1 || maxQueues > 256 { return "max-queues \(maxQueues) is outside 1...256" }
        if maxRingPageOrder < 0 || maxRingPageOrder > Self.ringPageOrderLimit {
            return "max-ring-page-order \(maxRingPageOrder) is outside 0...\(Self.ringPageOrderLimit)"
        }
        if maxIndirectSegments < 0 || maxIndirectSegments > Self.indirectSegmentLimit {
            return "max-indirect-segments \(maxIndirectSegments) is outside 0...\(Self.indirectSegmentLimit)"
        }
        if maxPersistentGrants < 0 || maxPersistentGrants > Self.persistentGrantLimit {
            return "max-persistent-grants \(maxPersistentGrants) is outside 0...\(Self.persistentGrantLimit)"
        }
        if !(storeConnectTimeout > 0 && storeConnectTimeout <= 3600) {
            return "store-connect-timeout \(storeConnectTimeout) is outside (0, 3600] seconds"
        }
        if !(storeRetryTimeout >= 0 && storeRetryTimeout <= 86400) {
            return "store-retry-timeout \(storeRetryTimeout) is outside 0...86400 seconds"
        }
        return nil
    }

    static func isValidKind(_ kind: String) -> Bool {
        !kind.isEmpty && kind.utf8.count <= 64 && kind.allSatisfy {
            $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "-" || $0 == "_")
        }
    }

    /// /local/domain/<domid>: where backend/ and error/ live.
    public var domainPath: String { "/local/domain/\(domid)" }

    public func backendRoot(kind: String) -> String { "\(domainPath)/backend/\(kind)" }

    /// backend/<kind>/<domid>/<devid> in our domain's tree.
    public func backendPath(_ vbd: VBDIdentity) -> String { "\(backendRoot(kind: vbd.kind))/\(vbd.domid)/\(vbd.devid)" }

    /// What a frontend's ring description may ask for.
    public var ringLimits: RingLimits {
        RingLimits(maxQueues: maxQueues, maxRingPageOrder: maxRingPageOrder, persistentGrants: persistentGrants)
    }
}
