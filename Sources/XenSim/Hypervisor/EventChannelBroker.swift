import Blkif
import CHypervisorShim
import Glibc
import Hypervisor
import Logging
import SimHypervisor
import Synchronization
import Xenbus

/// The simulated hypervisor's event-channel service (EVTCHNOP_alloc_unbound,
/// bind_interdomain, close), run inside `xensim run`. Each domain has a listening socket
/// DIR/evtchn/dom<N>.sock; a connection through it acts as domain N, like xenstored's guest
/// sockets. Ports are per domain, numbered from 1, and owned by the connection that made
/// them (closed when it goes, like a libxenevtchn handle). Binding hands both sides a pair of
/// eventfds (SimEventChannels), so events never pass through the broker. Every message to
/// a connection of domain N counts in DIR/evtchn/dom<N>.news, so a client looks at its socket
/// only when there is something to read.
///
/// Driving it: poll `fileDescriptor` (an epoll fd over all its sockets) for readability and
/// call `handleEvents()`, which never blocks.
public final class EventChannelBroker: @unchecked Sendable {
    /// Xen's 2-level ABI limit for 64-bit guests.
    public static let maxPorts: UInt32 = 4096
    /// Requests served per connection per wakeup, so one chatty guest cannot starve others.
    static let requestsPerWakeup = 64

    public let layout: SimLayout
    private let epoll: Int32
    private let lock = Mutex(())
    private let logger: Logger

    private enum State { case unbound(remote: UInt32), interdomain(domain: UInt32, port: UInt32) }
    private struct Port { var owner: Int32; var state: State }

    private var listeners: [Int32: UInt32] = [:]
    private var listenerOf: [UInt32: Int32] = [:]
    private var connections: [Int32: UInt32] = [:]
    /// Per served domain, its mapped DIR/evtchn/dom<N>.news.
    private var news: [UInt32: SimSharedFile] = [:]
    private var ports: [UInt32: [UInt32: Port]] = [:]
    /// Connections whose socket failed mid-operation; dropped when the operation is done.
    private var doomed: [Int32] = []

    /// Creates DIR/evtchn, listens for dom0 and for every domain already under DIR/domains.
    public init(directory: String, logger: Logger = Logger(label: "xensim.evtchn")) throws {
        layout = SimLayout(directory: directory)
        self.logger = logger
        guard mkdir(layout.eventChannelDirectory, 0o755) == 0 || Glibc.errno == EEXIST else {
            throw HypervisorError.simulatorUnavailable(path: layout.eventChannelDirectory, errno: Glibc.errno)
        }
        epoll = epoll_create1(Int32(EPOLL_CLOEXEC))
        guard epoll >= 0 else { throw HypervisorError.simulatorUnavailable(path: "epoll", errno: Glibc.errno) }
        try addDomain(0)
        try syncDomains()
    }

    deinit {
        for fd in connections.keys { close(fd) }
        for (fd, domid) in listeners {
            close(fd)
            unlink(layout.eventChannelSocket(domid))
            unlink(layout.eventChannelNews(domid))
        }
        close(epoll)
    }

    /// Readable when `handleEvents()` has work.
    public var fileDescriptor: Int32 { epoll }

    /// Starts listening for domain `domid` (call when the domain is created).
    public func addDomain(_ domid: UInt32) throws {
        try lock.withLock { _ in
            guard listenerOf[domid] == nil else { return }
            let path = layout.eventChannelSocket(domid)
            // The counter exists before anyone can connect; an existing one keeps counting.
            let newsPath = layout.eventChannelNews(domid)
            let newsFile = open(newsPath, O_RDWR | O_CREAT | O_CLOEXEC, 0o644)
            guard newsFile >= 0 else { throw HypervisorError.simulatorUnavailable(path: newsPath, errno: Glibc.errno) }
            let sized = ftruncate(newsFile, 64) == 0 ? 0 : Glibc.errno
            close(newsFile)
            guard sized == 0 else { throw HypervisorError.simulatorUnavailable(path: newsPath, errno: sized) }
            news[domid] = try SimSharedFile(path: newsPath)
            let fd = socket(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
            guard fd >= 0 else { throw HypervisorError.simulatorUnavailable(path: path, errno: Glibc.errno) }
            unlink(path)
            let bound = SimEventChannelWire.withAddress(path) { bind(fd, $0, $1) }
            guard bound == 0, listen(fd, 64) == 0 else {
                let error = bound == nil ? ENAMETOOLONG : Glibc.errno
                close(fd)
                throw HypervisorError.simulatorUnavailable(path: path, errno: error)
            }
            listeners[fd] = domid
            listenerOf[domid] = fd
            ports[domid] = ports[domid] ?? [:]
            watch(fd)
        }
    }

    /// Stops serving domain `domid` (call when it is destroyed): its connections and ports
    /// close, and every peer port reverts to unbound, as on Xen's domain destruction.
    public func removeDomain(_ domid: UInt32) {
        lock.withLock { _ in
            if let fd = listenerOf.removeValue(forKey: domid) {
                listeners[fd] = nil
                unwatchAndClose(fd)
                unlink(layout.eventChannelSocket(domid))
                unlink(layout.eventChannelNews(domid))
            }
            news[domid] = nil
            for (fd, owner) in connections where owner == domid { drop(fd) }
            dropDoomed()
            ports[domid] = nil
        }
    }

    /// Matches the served domains to DIR/domains (dom0 always stays): call after
    /// `xensim domain create|destroy`, e.g. on xenstored's @introduceDomain/@releaseDomain.
    public func syncDomains() throws {
        let present = Set(SimDomain.list(directory: layout.directory))
        let served = lock.withLock { _ in Set(listenerOf.keys) }
        for domid in present.subtracting(served) { try addDomain(domid) }
        for domid in served.subtracting(present) where domid != 0 { removeDomain(domid) }
    }

    /// Serves everything ready now: accepts connections and answers requests.
    public func handleEvents() {
        lock.withLock { _ in
            var events = [epoll_event](repeating: epoll_event(), count: 64)
            let n = epoll_wait(epoll, &events, Int32(events.count), 0)
            for event in events.prefix(max(0, Int(n))) {
                let fd = Int32(truncatingIfNeeded: event.data.u64)
                if let domid = listeners[fd] {
                    acceptConnections(on: fd, domain: domid)
                } else if connections[fd] != nil {
                    serve(fd)
                }
                dropDoomed()
            }
        }
    }

    // MARK: connections (all below run under `lock`)

    private func acceptConnections(on listener: Int32, domain: UInt32) {
        while true {
            let fd = Glibc.accept(listener, nil, nil)
            guard fd >= 0 else { return }
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
            _ = fcntl(fd, F_SETFL, O_NONBLOCK)
            connections[fd] = domain
            watch(fd)
        }
    }

    private func serve(_ fd: Int32) {
        for _ in 0..<EventChannelBroker.requestsPerWakeup {
            guard connections[fd] != nil, !doomed.contains(fd) else { return }
            switch SimEventChannelWire.receive(on: fd, blocking: false) {
            case .empty:
                return
            case .closed:
                drop(fd)
                return
            case let .message(request, fds):
                fds.forEach { close($0) }  // clients have no business sending descriptors
                handle(request, from: fd)
            }
        }
    }

    private func handle(_ request: SimEventChannelMessage, from fd: Int32) {
        guard let domid = connections[fd] else { return }
        let remote = request.domain == SimEventChannelMessage.domidSelf ? domid : request.domain
        switch SimEventChannelMessage.Operation(rawValue: request.operation) {
        case .allocUnbound:
            guard ports[remote] != nil else { return reply(request.reply(status: ESRCH), to: fd) }
            guard let port = allocate(in: domid) else { return reply(request.reply(status: ENOSPC), to: fd) }
            ports[domid]![port] = Port(owner: fd, state: .unbound(remote: remote))
            reply(request.reply(port: port), to: fd)
        case .bindInterdomain:
            bindInterdomain(request, from: fd, domain: domid, remote: remote)
        case .unbind:
            guard let port = ports[domid]?[request.port], port.owner == fd else {
                return reply(request.reply(status: EINVAL), to: fd)
            }
            closePort(domain: domid, port: request.port)
            reply(request.reply(), to: fd)
        default:
            reply(request.reply(status: ENOSYS), to: fd)
        }
    }

    /// Xen's evtchn_bind_interdomain: the remote port must be unbound and reserved for us.
    private func bindInterdomain(_ request: SimEventChannelMessage, from fd: Int32, domain local: UInt32, remote: UInt32) {
        guard ports[remote] != nil else { return reply(request.reply(status: ESRCH), to: fd) }
        guard let remotePort = ports[remote]?[request.port], case let .unbound(allowed) = remotePort.state,
              allowed == local else {
            return reply(request.reply(status: EINVAL), to: fd)
        }
        guard let localPort = allocate(in: local) else { return reply(request.reply(status: ENOSPC), to: fd) }
        let localWait = eventfd(0, Int32(EFD_CLOEXEC | EFD_NONBLOCK))
        let remoteWait = eventfd(0, Int32(EFD_CLOEXEC | EFD_NONBLOCK))
        defer {
            if localWait >= 0 { Glibc.close(localWait) }
            if remoteWait >= 0 { Glibc.close(remoteWait) }
        }
        guard localWait >= 0, remoteWait >= 0 else { return reply(request.reply(status: Glibc.errno), to: fd) }
        ports[local]![localPort] = Port(owner: fd, state: .interdomain(domain: remote, port: request.port))
        ports[remote]![request.port]!.state = .interdomain(domain: local, port: localPort)
        // The remote side learns first, so it knows the channel before we can notify it.
        push(SimEventChannelMessage(.bound, port: request.port), fds: [remoteWait, localWait], to: remotePort.owner)
        // Xen marks the new local port pending: events sent to the unbound port were lost.
        var one: UInt64 = 1
        _ = write(localWait, &one, 8)
        reply(request.reply(port: localPort), fds: [localWait, remoteWait], to: fd)
        logger.debug("event channel bound", metadata: [
            "local": "\(local):\(localPort)", "remote": "\(remote):\(request.port)"])
    }

    /// Xen's evtchn_close: the peer's port goes back to unbound, reserved for us.
    private func closePort(domain: UInt32, port: UInt32) {
        guard let closing = ports[domain]?.removeValue(forKey: port) else { return }
        guard case let .interdomain(peerDomain, peerPort) = closing.state,
              let peer = ports[peerDomain]?[peerPort],
              case let .interdomain(backDomain, backPort) = peer.state, backDomain == domain, backPort == port else {
            return
        }
        ports[peerDomain]![peerPort]!.state = .unbound(remote: domain)
        push(SimEventChannelMessage(.peerClosed, port: peerPort), fds: [], to: peer.owner)
    }

    private func allocate(in domain: UInt32) -> UInt32? {
        guard let table = ports[domain] else { return nil }
        return (1..<EventChannelBroker.maxPorts).first { table[$0] == nil }
    }

    private func reply(_ message: SimEventChannelMessage, fds: [Int32] = [], to fd: Int32) {
        push(message, fds: fds, to: fd)
    }

    private func push(_ message: SimEventChannelMessage, fds: [Int32], to fd: Int32) {
        guard !doomed.contains(fd) else { return }
        let error = SimEventChannelWire.send(message, fds: fds, on: fd)
        guard error != 0 else {
            // Counted once sent: a client that sees the count move finds the message there.
            if let domid = connections[fd], let counter = news[domid] {
                hv_increment64(counter.base.assumingMemoryBound(to: UInt64.self))
            }
            return
        }
        let metadata: Logger.Metadata = ["domid": "\(connections[fd] ?? 0)"]
        if error == EAGAIN {
            logger.info("dropping event channel client that does not read its socket", metadata: metadata)
        } else {
            logger.debug("event channel client went away", metadata: metadata)
        }
        doomed.append(fd)
    }

    private func drop(_ fd: Int32) {
        guard let domid = connections.removeValue(forKey: fd) else { return }
        unwatchAndClose(fd)
        let owned = ports[domid]?.filter { $0.value.owner == fd }.map(\.key) ?? []
        for port in owned { closePort(domain: domid, port: port) }
        // A client gone may be a process gone: its grant mappings go with it, as in Xen.
        SimGrantMapper.releasePinsOfDeadProcesses(directory: layout.directory)
    }

    /// The periodic part of the hypervisor's housekeeping: pins of processes that died after
    /// their event-channel connections closed (`xensim run` calls it every second).
    public func tick() {
        SimGrantMapper.releasePinsOfDeadProcesses(directory: layout.directory)
    }

    private func dropDoomed() {
        while let fd = doomed.popLast() { drop(fd) }
    }

    private func watch(_ fd: Int32) {
        var event = epoll_event()
        event.events = EPOLLIN.rawValue
        event.data.u64 = UInt64(UInt32(bitPattern: fd))
        _ = epoll_ctl(epoll, EPOLL_CTL_ADD, fd, &event)
    }

    private func unwatchAndClose(_ fd: Int32) {
        _ = epoll_ctl(epoll, EPOLL_CTL_DEL, fd, nil)
        Glibc.close(fd)
    }
}
