import Foundation
import Glibc
import Xenbus

/// What a backend accepts of a frontend's ring description (its offers in xenstore).
public struct RingLimits: Equatable, Sendable {
    /// multi-queue-max-queues.
    public var maxQueues: Int
    /// max-ring-page-order.
    public var maxRingPageOrder: Int
    /// feature-persistent offered.
    public var persistentGrants: Bool

    public init(maxQueues: Int, maxRingPageOrder: Int, persistentGrants: Bool) {
        self.maxQueues = maxQueues
        self.maxRingPageOrder = maxRingPageOrder
        self.persistentGrants = persistentGrants
    }
}

/// One queue's shared ring: the grant references of its pages and its event channel.
public struct RingQueue: Equatable, Sendable {
    public var ringRefs: [UInt32]
    public var eventChannel: UInt32

    public init(ringRefs: [UInt32], eventChannel: UInt32) {
        self.ringRefs = ringRefs
        self.eventChannel = eventChannel
    }
}

/// A frontend's validated ring description (what connect_ring and read_per_ring_refs read).
public struct RingDescription: Equatable, Sendable {
    public var `protocol`: BlkifProtocol
    /// Pages per ring = 1 << ringPageOrder; 0 also when the frontend used the one-page keys.
    public var ringPageOrder: Int
    public var queues: [RingQueue]
    /// Negotiated: we offer it and the frontend asked for it.
    public var persistentGrants: Bool

    public init(`protocol`: BlkifProtocol, ringPageOrder: Int, queues: [RingQueue], persistentGrants: Bool) {
        self.protocol = `protocol`
        self.ringPageOrder = ringPageOrder
        self.queues = queues
        self.persistentGrants = persistentGrants
    }
}

extension RingDescription {
    /// Reads and validates the description through `lookup`, which returns the value of a key
    /// relative to the frontend directory ("ring-ref", "queue-1/event-channel") or nil when
    /// it is missing. Reads only the keys the description calls for, so a hostile frontend
    /// bounds our work to maxQueues × (2 + 2^maxRingPageOrder) reads.
    public static func read(limits: RingLimits,
                            lookup: (String) throws -> String?) throws -> RingDescription {
        let protocolValue = try lookup("protocol")
        guard let blkifProtocol = BlkifProtocol(xenstoreValue: protocolValue) else {
            throw XenbusFailure(errno: ENOSYS, message: "unknown fe protocol \(XenbusValue.sanitized(protocolValue ?? ""))")
        }

        // xenbus_read_unsigned with default 0: a frontend that offers nothing gets nothing.
        let frontendPersistent = try unsigned(lookup, "feature-persistent", default: 0) != 0
        let persistentGrants = limits.persistentGrants && frontendPersistent

        let queueCount = try unsigned(lookup, "multi-queue-num-queues", default: 1)
        guard queueCount >= 1, queueCount <= UInt64(limits.maxQueues) else {
            throw XenbusFailure(errno: ENOSYS, message:
                "guest requested \(queueCount) queues, exceeding the maximum of \(limits.maxQueues).")
        }

        // ring-page-order lives at the top level and applies to every queue; when present
        // (even 0) the refs are ring-ref0..N, otherwise the single ring-ref.
        let ringPageOrder: Int
        let multiPage: Bool
        if let orderValue = try lookup("ring-page-order") {
            guard let order = XenbusValue.unsigned(orderValue) else {
                throw XenbusFailure(errno: EINVAL, message: "reading ring-page-order: '\(XenbusValue.sanitized(orderValue))' is not a number")
            }
            guard order <= UInt64(limits.maxRingPageOrder) else {
                throw XenbusFailure(errno: EINVAL, message:
                    "requested ring page order \(order) exceed max:\(limits.maxRingPageOrder)")
            }
            ringPageOrder = Int(order)
            multiPage = true
        } else {
            ringPageOrder = 0
            multiPage = false
        }

        // One queue: keys at the top level (even when multi-queue-num-queues=1 was written).
        let directories = queueCount == 1 ? [""] : (0..<Int(queueCount)).map { "queue-\($0)/" }
        let queues = try directories.map { directory in
            try readQueue(lookup, directory: directory, pages: 1 << ringPageOrder, multiPage: multiPage)
        }
        return RingDescription(protocol: blkifProtocol, ringPageOrder: ringPageOrder,
                               queues: queues, persistentGrants: persistentGrants)
    }

    /// The same over the frontend's keys already gathered into a dictionary.
    public static func read(limits: RingLimits, keys: [String: String]) throws -> RingDescription {
        try read(limits: limits) { keys[$0] }
    }

    private static func readQueue(_ lookup: (String) throws -> String?, directory: String,
                                  pages: Int, multiPage: Bool) throws -> RingQueue {
        let eventChannel = try required32(lookup, directory + "event-channel")
        let names = multiPage ? (0..<pages).map { "\(directory)ring-ref\($0)" } : ["\(directory)ring-ref"]
        let refs = try names.map { try required32(lookup, $0) }
        return RingQueue(ringRefs: refs, eventChannel: eventChannel)
    }

    private static func required32(_ lookup: (String) throws -> String?, _ key: String) throws -> UInt32 {
        guard let value = try lookup(key) else {
            throw XenbusFailure(errno: EINVAL, message: "reading \(key): missing")
        }
        guard let number = XenbusValue.unsigned(value), let narrow = UInt32(exactly: number) else {
            throw XenbusFailure(errno: EINVAL, message: "reading \(key): '\(XenbusValue.sanitized(value))' is not a 32-bit unsigned number")
        }
        return narrow
    }

    private static func unsigned(_ lookup: (String) throws -> String?, _ key: String, default fallback: UInt64) throws -> UInt64 {
        guard let value = try lookup(key) else { return fallback }
        guard let number = XenbusValue.unsigned(value) else {
            throw XenbusFailure(errno: EINVAL, message: "reading \(key): '\(XenbusValue.sanitized(value))' is not a number")
        }
        return number
    }
}

extension RingDescription {
    /// The frontend's keys for this description, relative to its directory, as
    /// talk_to_blkback writes them; `read` takes them back. One queue: keys at the top level;
    /// more: multi-queue-num-queues and queue-N/. Order 0: ring-ref; else ring-page-order and
    /// ring-ref0..N.
    public var keys: [(String, String)] {
        var keys: [(String, String)] = []
        if ringPageOrder > 0 { keys.append(("ring-page-order", "\(ringPageOrder)")) }
        if queues.count > 1 { keys.append(("multi-queue-num-queues", "\(queues.count)")) }
        for (index, queue) in queues.enumerated() {
            let directory = queues.count == 1 ? "" : "queue-\(index)/"
            if ringPageOrder > 0 {
                for (page, ref) in queue.ringRefs.enumerated() { keys.append(("\(directory)ring-ref\(page)", "\(ref)")) }
            } else {
                keys.append(("\(directory)ring-ref", "\(queue.ringRefs.first ?? 0)"))
            }
            keys.append(("\(directory)event-channel", "\(queue.eventChannel)"))
        }
        keys.append(("protocol", self.protocol.xenstoreValue))
        keys.append(("feature-persistent", persistentGrants ? "1" : "0"))
        return keys
    }

    /// Whether a frontend key (a name in its directory) is part of a ring description: those
    /// of an earlier session, perhaps of another shape, must go before new ones are written.
    public static func isRingKey(_ name: String) -> Bool {
        name.hasPrefix("ring-ref") || name.hasPrefix("queue-") || name == "ring-page-order"
            || name == "multi-queue-num-queues" || name == "event-channel"
    }
}
