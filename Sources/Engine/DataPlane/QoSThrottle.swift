import Synchronization
import VBDInterface

/// One VBD's QoS limits as token buckets, shared by its rings. A request takes one token from
/// each operation bucket that applies (total, and read or write) and its bytes from each byte
/// bucket; it is admitted when every bucket holds its cost (or a full bucket, for a request
/// larger than the bucket), and the bucket may then go below zero: the debt delays the next
/// ones, so the long-run rate is the limit whatever the request sizes. Buckets hold
/// `burst_seconds` of their rate (at least 0.1 s, and one request).
final class QoSThrottle: Sendable {
    private struct Bucket {
        let perNanosecond: Double
        let capacity: Double
        var tokens: Double

        init?(perSecond: UInt64, burstSeconds: UInt64) {
            guard perSecond > 0 else { return nil }
            perNanosecond = Double(perSecond) / 1e9
            capacity = max(Double(perSecond) * max(Double(burstSeconds), 0.1), 1)
            tokens = capacity
        }

        mutating func refill(_ nanoseconds: UInt64) { tokens = min(capacity, tokens + Double(nanoseconds) * perNanosecond) }

        /// Nanoseconds until `cost` (capped at a full bucket) is there; 0 when it is.
        func wait(for cost: Double) -> UInt64 {
            let needed = min(cost, capacity) - tokens
            return needed <= 0 ? 0 : UInt64((needed / perNanosecond).rounded(.up))
        }
    }

    private struct State {
        var limits = QoSLimits.none
        /// total, read, write operations; total, read, write bytes.
        var buckets: [Bucket?] = Array(repeating: nil, count: 6)
        var refilled: UInt64 = 0
    }

    private let state: Locked<State>
    /// Whether any limit is set: the unlimited path takes no lock.
    private let active = Atomic<Bool>(false)

    init(_ limits: QoSLimits, now: UInt64) {
        state = Locked(State())
        update(limits, now: now)
    }

    var limits: QoSLimits { state.withLock { $0.limits } }

    /// New limits, in force for the next request; their buckets start full.
    func update(_ limits: QoSLimits, now: UInt64) {
        state.withLock { state in
            let burst = limits.burstSeconds
            state.limits = limits
            state.buckets = [limits.totalIOPS, limits.readIOPS, limits.writeIOPS,
                             limits.totalBytesPerSecond, limits.readBytesPerSecond, limits.writeBytesPerSecond]
                .map { Bucket(perSecond: $0, burstSeconds: burst) }
            state.refilled = now
        }
        active.store(!limits.isUnlimited, ordering: .releasing)
    }

    /// Admits a READ or WRITE of `bytes` now (taking its tokens) and returns nil, or returns
    /// how many nanoseconds to wait before asking again.
    func admit(isWrite: Bool, bytes: UInt64, now: UInt64) -> UInt64? {
        guard active.load(ordering: .acquiring) else { return nil }
        return state.withLock { state in
            let elapsed = now &- state.refilled
            if elapsed < UInt64.max / 2 {
                for index in state.buckets.indices { state.buckets[index]?.refill(elapsed) }
                state.refilled = now
            }
            let applying = isWrite ? [0, 2, 3, 5] : [0, 1, 3, 4]
            let cost = { (index: Int) in index < 3 ? 1 : Double(bytes) }
            let wait = applying.map { state.buckets[$0]?.wait(for: cost($0)) ?? 0 }.max() ?? 0
            guard wait == 0 else { return wait }
            for index in applying { state.buckets[index]?.tokens -= cost(index) }
            return nil
        }
    }
}
