import Blkif
import Glibc
import Hypervisor
import SimHypervisor
import Xenbus

/// Write end of the pipe the signal handler pokes; set once before any signal is handled.
nonisolated(unsafe) private var signalPipe: Int32 = -1

/// The one poll() loop of `xensim run`: every simulated service (xenstored, and later grant
/// tables and event channels) registers its descriptors here, so the whole simulator is a
/// single thread and no client gets a thread of its own.
public final class EventLoop {
    public struct Events: OptionSet, Sendable {
        public let rawValue: Int16
        public init(rawValue: Int16) { self.rawValue = rawValue }
        public static let readable = Events(rawValue: Int16(POLLIN))
        public static let writable = Events(rawValue: Int16(POLLOUT))
        /// Reported only: the peer hung up or the descriptor failed.
        public static let hangup = Events(rawValue: Int16(POLLHUP))
        public static let error = Events(rawValue: Int16(POLLERR) | Int16(POLLNVAL))
    }

    public typealias Handler = (Events) -> Void

    private struct Registration {
        let serial: Int
        var events: Events
        let handler: Handler
    }

    private var registrations: [Int32: Registration] = [:]
    private var nextSerial = 0
    private var stopping = false

    public init() {}

    /// Calls `handler` with the ready events whenever `descriptor` is ready for `events`
    /// (hangups and errors are always reported). Replaces an earlier registration.
    public func register(_ descriptor: Int32, for events: Events = .readable, handler: @escaping Handler) {
        nextSerial += 1
        registrations[descriptor] = Registration(serial: nextSerial, events: events, handler: handler)
    }

    /// Changes what a registered descriptor waits for.
    public func setEvents(_ events: Events, for descriptor: Int32) {
        registrations[descriptor]?.events = events
    }

    /// Stops watching `descriptor`; safe to call from inside any handler.
    public func unregister(_ descriptor: Int32) {
        registrations[descriptor] = nil
    }

    /// Makes `run()` return after the current round.
    public func stop() { stopping = true }

    /// Stops the loop when one of `signals` arrives: the handler only writes to a pipe that
    /// this loop reads (the self-pipe trick), so the stop happens between two rounds.
    public func stop(onSignals signals: [Int32]) throws {
        var pipeEnds: [Int32] = [0, 0]
        guard pipe(&pipeEnds) == 0 else { throw SystemCallError(operation: "pipe", errno: errno) }
        for end in pipeEnds {
            _ = fcntl(end, F_SETFL, O_NONBLOCK)
            _ = fcntl(end, F_SETFD, FD_CLOEXEC)
        }
        signalPipe = pipeEnds[1]
        for signal in signals {
            var action = sigaction()
            action.__sigaction_handler.sa_handler = { _ in
                var byte: UInt8 = 1
                _ = write(signalPipe, &byte, 1)
            }
            action.sa_flags = SA_RESTART
            guard sigaction(signal, &action, nil) == 0 else { throw SystemCallError(operation: "sigaction", errno: errno) }
        }
        register(pipeEnds[0]) { [unowned self] _ in
            var bytes = [UInt8](repeating: 0, count: 16)
            while read(pipeEnds[0], &bytes, bytes.count) > 0 { self.stop() }
        }
    }

    /// Waits once (at most `timeoutMilliseconds`, -1 = forever) and dispatches what is ready.
    public func runOnce(timeoutMilliseconds: Int32 = -1) throws {
        let snapshot = registrations.map { ($0.key, $0.value.serial) }
        var descriptors = registrations.map { pollfd(fd: $0.key, events: $0.value.events.rawValue, revents: 0) }
        let ready = poll(&descriptors, nfds_t(descriptors.count), timeoutMilliseconds)
        if ready < 0 {
            if errno == EINTR { return }
            throw SystemCallError(operation: "poll", errno: errno)
        }
        for (index, descriptor) in descriptors.enumerated() where descriptor.revents != 0 {
            // A handler may have closed or replaced this descriptor earlier in this round.
            guard let registration = registrations[descriptor.fd],
                  registration.serial == snapshot[index].1 else { continue }
            registration.handler(Events(rawValue: descriptor.revents))
        }
    }

    /// Dispatches until `stop()`; calls `tick` about once a second, and at least that often.
    public func run(tick: (() -> Void)? = nil) throws {
        stopping = false
        var last = monotonicNanoseconds()
        while !stopping {
            try runOnce(timeoutMilliseconds: tick == nil ? -1 : 1000)
            let now = monotonicNanoseconds()
            if let tick, now &- last >= 1_000_000_000 {
                last = now
                tick()
            }
        }
    }
}
