import Blkif
import Synchronization

/// The request kinds latency is recorded for (Prometheus label `op`).
public enum BlockOperationKind: Int, CaseIterable, Sendable, CustomStringConvertible {
    case read, write, flush, discard

    public var description: String {
        switch self {
        case .read: "read"
        case .write: "write"
        case .flush: "flush"
        case .discard: "discard"
        }
    }
}

/// Request latency (taken off the ring → response written) in fixed buckets, cumulative
/// since connect.
public struct LatencyHistogram: Sendable, Equatable {
    /// Upper bounds in seconds, 10 µs to 5 s; one more bucket (+Inf) follows them.
    public static let upperBounds: [Double] = [
        0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5,
        0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
    ]
    private static let upperBoundsNanoseconds = upperBounds.map { UInt64($0 * 1e9) }

    /// Observations per bucket (not cumulative); `counts.count == upperBounds.count + 1`.
    public internal(set) var counts: [UInt64]
    public internal(set) var sumNanoseconds: UInt64

    public init() {
        counts = Array(repeating: 0, count: Self.upperBounds.count + 1)
        sumNanoseconds = 0
    }

    public var count: UInt64 { counts.reduce(0, &+) }
    public var sumSeconds: Double { Double(sumNanoseconds) / 1e9 }

    /// Prometheus' `le` buckets: observations at or below each bound, then +Inf.
    public var cumulativeCounts: [UInt64] {
        var total: UInt64 = 0
        return counts.map { total &+= $0; return total }
    }

    public mutating func record(nanoseconds: UInt64) {
        let bucket = Self.upperBoundsNanoseconds.firstIndex { nanoseconds <= $0 } ?? Self.upperBounds.count
        counts[bucket] &+= 1
        sumNanoseconds &+= nanoseconds
    }

    mutating func add(_ other: LatencyHistogram) {
        for index in counts.indices { counts[index] &+= other.counts[index] }
        sumNanoseconds &+= other.sumNanoseconds
    }
}

/// One VBD's data-path counters, cumulative since connect; the names of Linux blkback's
/// sysfs statistics are given per field.
public struct VBDStatistics: Sendable, Equatable {
    /// rd_req: read requests taken off the rings (direct and indirect).
    public var readRequests: UInt64 = 0
    /// wr_req: write requests.
    public var writeRequests: UInt64 = 0
    /// f_req: flush and barrier requests.
    public var flushRequests: UInt64 = 0
    /// ds_req: discard requests.
    public var discardRequests: UInt64 = 0
    /// oo_req: times a ring had to wait for I/O resources (the io_uring refused a submission).
    public var outOfResources: UInt64 = 0
    /// rd_sect / wr_sect: 512-byte sectors submitted for reading / writing.
    public var readSectors: UInt64 = 0
    public var writeSectors: UInt64 = 0
    /// Responses with a status other than OK (error or EOPNOTSUPP).
    public var errors: UInt64 = 0
    /// Requests taken but not yet answered.
    public var inflight: UInt64 = 0
    /// Grants kept mapped across requests now (feature-persistent), over all rings.
    public var persistentGrants: UInt64 = 0
    /// Frontend notifications that found no request and left the event channel masked for a
    /// while (XSA-332 backoff).
    public var spuriousEvents: UInt64 = 0
    /// Data pages copied rather than mapped because the guest was at its grant cap.
    public var grantCapCopiedPages: UInt64 = 0
    /// Rings no longer served (their frontend broke the protocol, or their I/O failed): a gauge.
    public var haltedRings: UInt64 = 0
    /// Rings whose network store is lost (an NBD server being reconnected, a Ceph cluster
    /// silent for 5 s): their requests wait (a gauge); and the times a lost NBD connection
    /// was made again.
    public var storeWaitingRings: UInt64 = 0
    public var storeReconnects: UInt64 = 0
    /// Requests QoS held back, and the time they spent held.
    public var delayedRequests: UInt64 = 0
    public var throttledNanoseconds: UInt64 = 0
    /// Latency per request kind, indexed by `BlockOperationKind.rawValue`.
    public var latency: [LatencyHistogram] = Array(repeating: LatencyHistogram(), count: BlockOperationKind.allCases.count)

    public init() {}

    public func latency(_ kind: BlockOperationKind) -> LatencyHistogram { latency[kind.rawValue] }

    public mutating func add(_ other: VBDStatistics) {
        readRequests &+= other.readRequests
        writeRequests &+= other.writeRequests
        flushRequests &+= other.flushRequests
        discardRequests &+= other.discardRequests
        outOfResources &+= other.outOfResources
        readSectors &+= other.readSectors
        writeSectors &+= other.writeSectors
        errors &+= other.errors
        inflight &+= other.inflight
        persistentGrants &+= other.persistentGrants
        haltedRings &+= other.haltedRings
        spuriousEvents &+= other.spuriousEvents
        grantCapCopiedPages &+= other.grantCapCopiedPages
        delayedRequests &+= other.delayedRequests
        storeWaitingRings &+= other.storeWaitingRings
        storeReconnects &+= other.storeReconnects
        throttledNanoseconds &+= other.throttledNanoseconds
        for index in latency.indices { latency[index].add(other.latency[index]) }
    }
}
