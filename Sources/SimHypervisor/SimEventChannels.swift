import CHypervisorShim
import Glibc
import Hypervisor
import Synchronization

/// Event channels of the simulator, as seen by one domain (the backend or a guest). Setup goes
/// through the broker in `xensim run` over DIR/evtchn/dom<N>.sock (connecting there is what
/// makes us domain N); once a channel is bound each side holds two eventfds — its own, to wait
/// on, and the peer's, to notify — so an event is one write, with no broker hop.
/// `fileDescriptor` is an epoll fd over our ports' eventfds and the broker socket.
/// Like the Linux evtchn device, a port reported by `pending()` stays masked until `unmask`.
public final class SimEventChannels: EventChannels, @unchecked Sendable {
    public let domain: UInt32
    private let socket: Int32
    private let epoll: Int32
    private static let brokerTag = UInt64.max

    private struct Port {
        var wait: Int32?
        var notify: Int32?
        var masked = false
    }
    private struct BrokerLink {
        var alive = true
        /// The broker's message count when its socket was last read.
        var newsSeen: UInt64 = 0
    }
    /// Serialises request/reply on the broker socket; taken before `ports`.
    private let channel = Mutex(BrokerLink())
    /// DIR/evtchn/dom<N>.news: the socket is read only when the count moved, not on each
    /// notify (nil with a broker that keeps no count: then it is read every time).
    private let news: SimSharedFile?
    private let ports = Mutex<[UInt32: Port]>([:])

    public init(directory: String, domain: UInt32) throws {
        let path = SimLayout(directory: directory).eventChannelSocket(domain)
        let fd = Glibc.socket(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw HypervisorError.simulatorUnavailable(path: path, errno: Glibc.errno) }
        let connected = SimEventChannelWire.withAddress(path) { connect(fd, $0, $1) }
        guard connected == 0 else {
            let error = connected == nil ? ENAMETOOLONG : Glibc.errno
            close(fd)
            throw HypervisorError.simulatorUnavailable(path: path, errno: error)
        }
        let ep = epoll_create1(Int32(EPOLL_CLOEXEC))
        guard ep >= 0 else {
            let error = Glibc.errno
            close(fd)
            throw HypervisorError.simulatorUnavailable(path: path, errno: error)
        }
        // A hung broker must not hang the daemon forever on a reply.
        var timeout = timeval(tv_sec: 10, tv_usec: 0)
        _ = setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        self.domain = domain
        socket = fd
        epoll = ep
        news = try? SimSharedFile(path: SimLayout(directory: directory).eventChannelNews(domain))
        control(EPOLL_CTL_ADD, fd, tag: SimEventChannels.brokerTag, readable: true)
    }

    deinit {
        close(socket)
        for port in ports.withLock({ $0.values }) {
            port.wait.map { _ = close($0) }
            port.notify.map { _ = close($0) }
        }
        close(epoll)
    }

    public var fileDescriptor: Int32 { epoll }

    /// Allocates a port that `remoteDomain` may bind to (EVTCHNOP_alloc_unbound), as a
    /// frontend does before writing event-channel to xenstore.
    public func allocUnbound(remoteDomain: UInt32) throws -> UInt32 {
        let (reply, _) = try request(SimEventChannelMessage(.allocUnbound, domain: remoteDomain), "alloc_unbound for domain \(remoteDomain)")
        ports.withLock { $0[reply.port] = Port() }
        return reply.port
    }

    public func bindInterdomain(remoteDomain: UInt32, remotePort: UInt32) throws -> UInt32 {
        let message = SimEventChannelMessage(.bindInterdomain, port: remotePort, domain: remoteDomain)
        let (reply, fds) = try request(message, "bind_interdomain to domain \(remoteDomain)", expectFDs: 2)
        ports.withLock { install(&$0, port: reply.port, wait: fds[0], notify: fds[1]) }
        return reply.port
    }

    public func unbind(_ localPort: UInt32) throws {
        _ = try request(SimEventChannelMessage(.unbind, port: localPort), "unbind")
        ports.withLock { table in
            guard let port = table.removeValue(forKey: localPort) else { return }
            if let wait = port.wait { control(EPOLL_CTL_DEL, wait, tag: 0, readable: false); close(wait) }
            port.notify.map { _ = close($0) }
        }
    }

    public func notify(_ localPort: UInt32) throws {
        // The broker's news comes first: a peer that unbound and bound again has a new
        // eventfd, and signalling the old one would lose the event.
        try channel.withLock { try drainBrokerIfNews(&$0) }
        _ = try signal(localPort)
    }

    /// Writes the peer's eventfd; false when the port exists but is unbound (Xen drops the
    /// event silently then).
    private func signal(_ localPort: UInt32) throws -> Bool {
        try ports.withLock { table in
            guard let port = table[localPort] else {
                throw HypervisorError.eventChannel(operation: "notify", port: localPort, errno: EINVAL)
            }
            guard let notify = port.notify else { return false }
            var one: UInt64 = 1
            _ = write(notify, &one, 8)
            return true
        }
    }

    public func pending() throws -> [UInt32] {
        try channel.withLock { try drainBrokerIfNews(&$0) }
        var fired: [UInt32] = []
        try withUnsafeTemporaryAllocation(of: epoll_event.self, capacity: 64) { events in
            while true {
                let n = epoll_wait(epoll, events.baseAddress, Int32(events.count), 0)
                if n < 0 && Glibc.errno == EINTR { continue }
                guard n > 0 else { break }
                let ready = events.prefix(Int(n))
                // Readable with no news yet (the count moves just after the send) or closed.
                if ready.contains(where: { $0.data.u64 == SimEventChannels.brokerTag }) {
                    try channel.withLock { try drainBroker(&$0) }
                }
                ports.withLock { table in
                    for event in ready where event.data.u64 != SimEventChannels.brokerTag {
                        let number = UInt32(truncatingIfNeeded: event.data.u64)
                        guard var port = table[number], let wait = port.wait, !port.masked else { continue }
                        var count: UInt64 = 0
                        _ = read(wait, &count, 8)
                        port.masked = true
                        control(EPOLL_CTL_MOD, wait, tag: UInt64(number), readable: false)
                        table[number] = port
                        fired.append(number)
                    }
                }
                if n < Int32(events.count) { break }
            }
        }
        return fired
    }

    public func unmask(_ localPort: UInt32) throws {
        try ports.withLock { table in
            guard var port = table[localPort] else {
                throw HypervisorError.eventChannel(operation: "unmask", port: localPort, errno: EINVAL)
            }
            guard port.masked, let wait = port.wait else { return }
            port.masked = false
            control(EPOLL_CTL_MOD, wait, tag: UInt64(localPort), readable: true)
            table[localPort] = port
        }
    }

    // MARK: broker conversation (callers hold `channel`)

    private func request(_ message: SimEventChannelMessage, _ what: String, expectFDs: Int = 0) throws
        -> (SimEventChannelMessage, [Int32]) {
        try channel.withLock { link in
            guard link.alive else {
                throw HypervisorError.eventChannel(operation: what + " (broker gone)", port: message.port, errno: ECONNRESET)
            }
            let sent = SimEventChannelWire.send(message, on: socket)
            guard sent == 0 else { throw HypervisorError.eventChannel(operation: what, port: message.port, errno: sent) }
            while true {
                switch SimEventChannelWire.receive(on: socket, blocking: true) {
                case .empty:  // SO_RCVTIMEO expired: the broker hangs
                    throw HypervisorError.eventChannel(operation: what + " (broker not answering)", port: message.port, errno: ETIMEDOUT)
                case .closed:
                    link.alive = false
                    throw HypervisorError.eventChannel(operation: what + " (broker gone)", port: message.port, errno: ECONNRESET)
                case let .message(reply, fds):
                    guard reply.operation == message.operation | SimEventChannelMessage.replyBit else {
                        apply(push: reply, fds: fds)
                        continue
                    }
                    guard reply.status == 0, fds.count == expectFDs else {
                        fds.forEach { close($0) }
                        throw HypervisorError.eventChannel(operation: what, port: message.port,
                                                           errno: reply.status != 0 ? reply.status : EPROTO)
                    }
                    return (reply, fds)
                }
            }
        }
    }

    /// Reads the broker's messages if its count moved since the last look.
    private func drainBrokerIfNews(_ link: inout BrokerLink) throws {
        if let news {
            let count = hv_load64(news.base.assumingMemoryBound(to: UInt64.self))
            guard count != link.newsSeen else { return }
            link.newsSeen = count
        }
        try drainBroker(&link)
    }

    private func drainBroker(_ link: inout BrokerLink) throws {
        while link.alive {
            switch SimEventChannelWire.receive(on: socket, blocking: false) {
            case .empty:
                return
            case .closed:
                // Bound channels keep working; stop polling a dead socket and say so once.
                control(EPOLL_CTL_DEL, socket, tag: 0, readable: false)
                link.alive = false
                throw HypervisorError.eventChannel(operation: "broker connection closed", port: 0, errno: ECONNRESET)
            case let .message(push, fds):
                apply(push: push, fds: fds)
            }
        }
    }

    private func apply(push: SimEventChannelMessage, fds: [Int32]) {
        switch SimEventChannelMessage.Operation(rawValue: push.operation) {
        case .bound where fds.count == 2:
            ports.withLock { install(&$0, port: push.port, wait: fds[0], notify: fds[1]) }
        case .peerClosed:
            ports.withLock { table in
                table[push.port]?.notify.map { _ = close($0) }
                table[push.port]?.notify = nil
            }
            fds.forEach { close($0) }
        default:
            fds.forEach { close($0) }
        }
    }

    private func install(_ table: inout [UInt32: Port], port number: UInt32, wait: Int32, notify: Int32) {
        if let old = table[number] {
            if let oldWait = old.wait { control(EPOLL_CTL_DEL, oldWait, tag: 0, readable: false); close(oldWait) }
            old.notify.map { _ = close($0) }
        }
        table[number] = Port(wait: wait, notify: notify, masked: false)
        control(EPOLL_CTL_ADD, wait, tag: UInt64(number), readable: true)
    }

    private func control(_ op: Int32, _ fd: Int32, tag: UInt64, readable: Bool) {
        var event = epoll_event()
        event.events = readable ? EPOLLIN.rawValue : 0
        event.data.u64 = tag
        _ = epoll_ctl(epoll, op, fd, &event)
    }
}
