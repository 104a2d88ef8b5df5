import Foundation
import Glibc
import Xenbus

/// What happens to a VBD, as `GET /v1/events` streams it.
public enum VBDEventType: String, Sendable, CaseIterable {
    /// The toolstack created the backend directory; the daemon took the device up.
    case added = "vbd-added"
    /// The backend's xenbus state changed (`state`).
    case backendState = "backend-state"
    /// The frontend's xenbus state changed (`state`).
    case frontendState = "frontend-state"
    /// The rings are mapped and served: what both ends negotiated.
    case connected
    /// A ring stopped being served because its frontend broke the protocol or its I/O failed.
    case ringHalted = "ring-halted"
    /// Requests were answered with an error (at most one event per ring and second, with a count).
    case ioError = "io-error"
    /// The device's size changed and the frontend was told (online resize).
    case resized
    /// The QoS limits changed.
    case qosChanged = "qos-changed"
    /// The device went away (its backend directory was removed).
    case removed = "vbd-removed"
}

/// One value in an event's details.
public enum VBDEventValue: Sendable, Equatable {
    case text(String)
    case number(UInt64)
    case flag(Bool)
}

/// One event: numbered by the log, in the order it was published.
public struct VBDEvent: Sendable {
    /// Increases by one per event over the daemon's life, from 1.
    public let id: UInt64
    /// When it was published: nanoseconds since the Unix epoch (CLOCK_REALTIME).
    public let time: UInt64
    public let type: VBDEventType
    public let vbd: VBDIdentity
    /// Members in the order they are written out.
    public let details: [(name: String, value: VBDEventValue)]
}

/// Which events one reader wants.
public struct VBDEventFilter: Sendable, Equatable {
    public var domid: DomainID?
    public var kind: String?

    public init(domid: DomainID? = nil, kind: String? = nil) {
        self.domid = domid
        self.kind = kind
    }

    public func admits(_ event: VBDEvent) -> Bool {
        (domid == nil || event.vbd.domid == domid) && (kind == nil || event.vbd.kind == kind)
    }
}

/// Every VBD event of the daemon: a bounded history for readers that reconnect, and bounded
/// queues for the readers now attached. Publishing never waits for a reader; a reader whose
/// queue is full is cut off (it can come back with its last id and find the rest in the
/// history). Safe from any thread.
public final class VBDEventLog: Sendable {
    public let historyCapacity: Int

    private struct State {
        var nextID: UInt64 = 1
        /// The latest `historyCapacity` events, oldest first (a ring buffer from `start`).
        var history: [VBDEvent] = []
        var start = 0
        var readers: [ObjectIdentifier: VBDEventSubscription] = [:]
    }
    private let state = Locked(State())

    public init(historyCapacity: Int = 4096) {
        self.historyCapacity = max(1, historyCapacity)
    }

    /// The id the next event gets.
    public var nextID: UInt64 { state.withLock { $0.nextID } }

    /// Numbers the event, keeps it in the history and hands it to every attached reader whose
    /// filter admits it.
    public func publish(_ type: VBDEventType, _ vbd: VBDIdentity, _ details: [(name: String, value: VBDEventValue)] = []) {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        let time = UInt64(now.tv_sec) * 1_000_000_000 + UInt64(now.tv_nsec)
        let readers: [VBDEventSubscription] = state.withLock { state in
            let event = VBDEvent(id: state.nextID, time: time, type: type, vbd: vbd, details: details)
            state.nextID += 1
            if state.history.count < historyCapacity {
                state.history.append(event)
            } else {
                state.history[state.start] = event
                state.start = (state.start + 1) % historyCapacity
            }
            return state.readers.values.filter { $0.offer(event) }
        }
        // Woken outside the log's lock: a wake-up may call into the HTTP server.
        for reader in readers { reader.wake() }
    }

    /// Attaches a reader. `after`: the last id it saw (Last-Event-ID); the history after it is
    /// queued first, and `lost` says what the history no longer holds. `wake` is called
    /// (on the publishing thread) when the reader's queue goes from empty to not empty or
    /// the reader is cut off.
    public func subscribe(after: UInt64?, filter: VBDEventFilter, capacity: Int,
                          wake: @escaping @Sendable () -> Void) -> VBDEventSubscription {
        state.withLock { state in
            let subscription = VBDEventSubscription(filter: filter, capacity: capacity, wake: wake)
            if let after {
                let ordered = state.history[state.start...] + state.history[..<state.start]
                let oldest = ordered.first?.id ?? state.nextID
                if after >= state.nextID {
                    // An id this daemon never gave (a previous daemon's): everything it has.
                    subscription.lost = .unknownLastID(after)
                    for event in ordered { _ = subscription.offer(event) }
                } else {
                    if after + 1 < oldest { subscription.lost = .range(first: after + 1, last: oldest - 1) }
                    for event in ordered where event.id > after { _ = subscription.offer(event) }
                }
            }
            state.readers[ObjectIdentifier(subscription)] = subscription
            return subscription
        }
    }

    public func unsubscribe(_ subscription: VBDEventSubscription) {
        _ = state.withLock { $0.readers.removeValue(forKey: ObjectIdentifier(subscription)) }
    }

    /// Readers attached now.
    public var readerCount: Int { state.withLock { $0.readers.count } }
}

/// One reader's queue.
public final class VBDEventSubscription: Sendable {
    /// What a reader that came back with Last-Event-ID missed.
    public enum Lost: Sendable, Equatable {
        /// These ids fell out of the history before the reader came back.
        case range(first: UInt64, last: UInt64)
        /// An id this daemon never gave (from a daemon before it).
        case unknownLastID(UInt64)
    }

    /// What the reader gets next.
    public enum Next: Sendable {
        case events([VBDEvent])
        /// Nothing now; `wake` is called when there is.
        case empty
        /// The queue overflowed and was dropped: the reader is cut off (it may come back with
        /// the last id it got and find the rest in the history).
        case cutOff
    }

    let filter: VBDEventFilter
    let capacity: Int
    private let wakeUp: @Sendable () -> Void

    private struct Queue {
        var events: [VBDEvent] = []
        var overflowed = false
        var lost: Lost?
    }
    private let queue = Locked(Queue())

    init(filter: VBDEventFilter, capacity: Int, wake: @escaping @Sendable () -> Void) {
        self.filter = filter
        self.capacity = max(1, capacity)
        self.wakeUp = wake
    }

    /// Set once, at subscription; taken by the first `takeLost`.
    public internal(set) var lost: Lost? {
        get { queue.withLock { $0.lost } }
        set { queue.withLock { $0.lost = newValue } }
    }

    /// Takes what the reader missed before it came back (once).
    public func takeLost() -> Lost? {
        queue.withLock { queue in
            defer { queue.lost = nil }
            return queue.lost
        }
    }

    /// Queues the event if the filter admits it; true when the reader must be woken.
    func offer(_ event: VBDEvent) -> Bool {
        guard filter.admits(event) else { return false }
        return queue.withLock { queue in
            if queue.overflowed { return false }
            if queue.events.count >= capacity {
                queue.overflowed = true
                queue.events = []
                return true
            }
            queue.events.append(event)
            return queue.events.count == 1
        }
    }

    func wake() { wakeUp() }

    /// Everything queued, oldest first.
    public func next() -> Next {
        queue.withLock { queue in
            if queue.overflowed { return .cutOff }
            guard !queue.events.isEmpty else { return .empty }
            defer { queue.events = [] }
            return .events(queue.events)
        }
    }
}

/// Publishes events of one VBD: what the data plane gets, so it never names the log.
public struct VBDEventReporter: Sendable {
    public let vbd: VBDIdentity
    private let log: VBDEventLog?

    public init(vbd: VBDIdentity, log: VBDEventLog?) {
        self.vbd = vbd
        self.log = log
    }

    public func callAsFunction(_ type: VBDEventType, _ details: [(name: String, value: VBDEventValue)] = []) {
        log?.publish(type, vbd, details)
    }
}
