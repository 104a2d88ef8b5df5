import Dispatch
import Engine
import Foundation

/// `GET /v1/events`: the engine's VBD events as Server-Sent Events. Each open stream has a
/// bounded queue in the event log; a stream that is not read while its queue fills is cut
/// off, and every other stream keeps its events. Idle streams get a comment line every
/// `heartbeatSeconds`, which keeps proxies from closing them and lets the server notice
/// clients that left.
public final class EventStreams: @unchecked Sendable {
    public struct Configuration: Sendable {
        /// Streams open at once; one more gets 503.
        public var maximumStreams = 1024
        /// Events queued for one stream before it is cut off.
        public var queueCapacity = 1024
        public var heartbeatSeconds = 15.0

        public init() {}
    }

    public let configuration: Configuration
    let log: VBDEventLog
    private let lock = NSLock()
    private var open: [ObjectIdentifier: EventStream] = [:]
    private let heartbeat: DispatchSourceTimer

    public init(log: VBDEventLog, configuration: Configuration = Configuration()) {
        self.log = log
        self.configuration = configuration
        heartbeat = DispatchSource.makeTimerSource(queue: DispatchQueue(label: "blkback-events-heartbeat"))
        let interval = max(configuration.heartbeatSeconds, 0.1)
        heartbeat.schedule(deadline: .now() + interval, repeating: interval)
        heartbeat.setEventHandler { [weak self] in
            guard let self else { return }
            for stream in lock.withLock({ Array(open.values) }) { stream.heartbeatDue() }
        }
        heartbeat.resume()
    }

    deinit { heartbeat.cancel() }

    public var openCount: Int { lock.withLock { open.count } }

    /// A new stream of the events `filter` admits, after `lastEventID` when the client came
    /// back (its history first); nil when `maximumStreams` are open.
    func openStream(filter: VBDEventFilter, lastEventID: UInt64?) -> EventStream? {
        lock.withLock {
            guard open.count < configuration.maximumStreams else { return nil }
            let stream = EventStream(hub: self, filter: filter, lastEventID: lastEventID)
            open[ObjectIdentifier(stream)] = stream
            return stream
        }
    }

    fileprivate func closed(_ stream: EventStream) {
        _ = lock.withLock { open.removeValue(forKey: ObjectIdentifier(stream)) }
    }
}

/// One client's stream: what is still to be written of the events taken from its queue.
final class EventStream: HTTPBodyStream, @unchecked Sendable {
    private unowned let hub: EventStreams
    private var subscription: VBDEventSubscription!
    private let lock = NSLock()
    private var wake: (@Sendable () -> Void)?
    /// Bytes formatted and not yet written, from `written`.
    private var pending: [UInt8]
    private var written = 0
    private var heartbeatOwed = false
    private var ending = false
    private var isClosed = false

    fileprivate init(hub: EventStreams, filter: VBDEventFilter, lastEventID: UInt64?) {
        self.hub = hub
        // The first bytes go out at once, so a client knows it is connected: a comment and
        // how long to wait before reconnecting.
        pending = Array(": blkback-server events\nretry: 2000\n\n".utf8)
        subscription = hub.log.subscribe(after: lastEventID, filter: filter, capacity: hub.configuration.queueCapacity) { [weak self] in
            self?.signal()
        }
        if let lost = subscription.takeLost() { pending += Self.format(lost) }
    }

    func attach(wake: @escaping @Sendable () -> Void) {
        lock.withLock { self.wake = wake }
    }

    private func signal() {
        lock.withLock { wake }?()
    }

    fileprivate func heartbeatDue() {
        lock.withLock { heartbeatOwed = true }
        signal()
    }

    func read(into buffer: UnsafeMutableRawBufferPointer) -> HTTPStreamRead {
        lock.withLock {
            if written == pending.count { refill() }
            if written == pending.count { return ending ? .end : .wait }
            let count = min(buffer.count, pending.count - written)
            pending.withUnsafeBytes { bytes in
                buffer.baseAddress!.copyMemory(from: bytes.baseAddress! + written, byteCount: count)
            }
            written += count
            return .bytes(count)
        }
    }

    /// Formats what the queue holds (or a heartbeat when it holds nothing and one is owed).
    private func refill() {
        pending.removeAll(keepingCapacity: true)
        written = 0
        guard !ending else { return }
        switch subscription.next() {
        case .events(let events):
            for event in events { pending += Self.format(event) }
        case .cutOff:
            pending += Array("event: cut-off\ndata: {\"error\":\"this stream fell \(hub.configuration.queueCapacity) events behind and was cut off; reconnect with Last-Event-ID\"}\n\n".utf8)
            ending = true
        case .empty:
            if heartbeatOwed { pending += Array(": heartbeat\n\n".utf8) }
        }
        heartbeatOwed = false
    }

    func close() {
        let first: Bool = lock.withLock {
            defer { isClosed = true }
            return !isClosed
        }
        guard first else { return }
        hub.log.unsubscribe(subscription)
        hub.closed(self)
    }

    // MARK: the wire format

    /// `id:`, `event:` and one `data:` line of JSON: the VBD, then the event's details.
    static func format(_ event: VBDEvent) -> [UInt8] {
        var members: [(String, JSONValue)] = [
            ("id", .integer(Int64(clamping: event.id))),
            ("type", .string(event.type.rawValue)),
            ("time", .string(timestamp(event.time))),
            ("domid", .integer(Int64(event.vbd.domid.rawValue))),
            ("devid", .integer(Int64(event.vbd.devid))),
            ("kind", .string(event.vbd.kind)),
        ]
        for (name, value) in event.details {
            switch value {
            case .text(let text): members.append((name, .string(text)))
            case .number(let number): members.append((name, .integer(Int64(clamping: number))))
            case .flag(let flag): members.append((name, .bool(flag)))
            }
        }
        return Array("id: \(event.id)\nevent: \(event.type.rawValue)\ndata: \(JSONValue.object(members).serialized())\n\n".utf8)
    }

    /// What a client that came back missed: `events-lost`, without an id (its Last-Event-ID
    /// stays the last event it got).
    static func format(_ lost: VBDEventSubscription.Lost) -> [UInt8] {
        let data: JSONValue
        switch lost {
        case .range(let first, let last):
            data = .object([("first_id", .integer(Int64(clamping: first))), ("last_id", .integer(Int64(clamping: last))),
                            ("reason", .string("these events are no longer in the history"))])
        case .unknownLastID(let id):
            data = .object([("last_event_id", .integer(Int64(clamping: id))),
                            ("reason", .string("this daemon never sent that id (it restarted); its whole history follows"))])
        }
        return Array("event: events-lost\ndata: \(data.serialized())\n\n".utf8)
    }

    /// RFC 3339, UTC, milliseconds.
    private static func timestamp(_ nanoseconds: UInt64) -> String {
        var seconds = time_t(nanoseconds / 1_000_000_000)
        var parts = tm()
        gmtime_r(&seconds, &parts)
        return String(format: "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", parts.tm_year + 1900, parts.tm_mon + 1, parts.tm_mday,
                      parts.tm_hour, parts.tm_min, parts.tm_sec, Int32(nanoseconds / 1_000_000 % 1000))
    }
}
