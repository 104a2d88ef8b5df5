import Blkif
import Glibc
import Hypervisor
import Logging
import SimHypervisor
import Xenbus

/// Serves `Xenstored` on unix sockets from the simulator's event loop: DIR/xenstored.sock for
/// dom0 (privileged) and DIR/dom<N>.sock for each introduced domain N, whose requests carry
/// domain N's permissions.
public final class XenstoredServer {
    /// A client that lets this much output pile up (it does not read) is disconnected.
    public static let maxPendingOutput = 1 << 20
    /// Above this much queued output a client's further requests wait until it reads.
    static let inputPauseThreshold = 64 << 10

    private final class Connection {
        let descriptor: Int32
        let id: Xenstored.ConnectionID
        let domid: UInt32
        var decoder = WireDecoder()
        var output: [UInt8] = []
        var outputOffset = 0
        init(descriptor: Int32, id: Xenstored.ConnectionID, domid: UInt32) {
            self.descriptor = descriptor
            self.id = id
            self.domid = domid
        }
        var pendingOutput: Int { output.count - outputOffset }
    }

    public let xenstored: Xenstored
    public let directory: SimLayout
    private let loop: EventLoop
    private let logger: Logger
    private var dom0Listener: Int32?
    private var guestListeners: [UInt32: Int32] = [:]
    private var connections: [Xenstored.ConnectionID: Connection] = [:]
    /// Other services of the simulated hypervisor that follow domains' lives (event
    /// channels): called on INTRODUCE before the toolstack gets its OK, and on RELEASE.
    public var onDomainIntroduced: ((UInt32) throws -> Void)?
    public var onDomainReleased: ((UInt32) -> Void)?

    public init(directory: SimLayout, loop: EventLoop, limits: Xenstored.Limits = .init(),
                logger: Logger = Logger(label: "xensim.xenstored")) {
        self.directory = directory
        self.loop = loop
        self.logger = logger
        xenstored = Xenstored(limits: limits, logger: logger)
        xenstored.onIntroduce = { [unowned self] domid in try self.openGuestSocket(domid) }
        xenstored.onRelease = { [unowned self] domid in self.closeGuestSocket(domid) }
    }

    /// Starts listening on DIR/xenstored.sock.
    public func start() throws {
        dom0Listener = try listen(at: directory.xenstoredSocket, as: .dom0)
        logger.info("xenstored listening on \(directory.xenstoredSocket)")
    }

    /// Closes every connection and socket and removes the socket files.
    public func shutdown() {
        for connection in Array(connections.values) { close(connection) }
        if let dom0Listener {
            loop.unregister(dom0Listener)
            Glibc.close(dom0Listener)
            unlink(directory.xenstoredSocket)
        }
        dom0Listener = nil
        for domid in Array(guestListeners.keys) { closeGuestSocket(domid) }
    }

    // MARK: sockets

    private func listen(at path: String, as caller: XenstoreCaller) throws -> Int32 {
        let listener = try UnixSocket.listen(at: path)
        loop.register(listener) { [unowned self] _ in self.accept(on: listener, as: caller) }
        return listener
    }

    /// INTRODUCE: the socket listens before the toolstack gets its OK.
    private func openGuestSocket(_ domid: UInt32) throws {
        guestListeners[domid] = try listen(at: directory.guestSocket(domid), as: .guest(domid))
        try onDomainIntroduced?(domid)
        logger.info("dom\(domid) xenstore socket \(directory.guestSocket(domid))")
    }

    /// RELEASE: the domain's socket and every connection through it go away.
    private func closeGuestSocket(_ domid: UInt32) {
        onDomainReleased?(domid)
        if let listener = guestListeners.removeValue(forKey: domid) {
            loop.unregister(listener)
            Glibc.close(listener)
            unlink(directory.guestSocket(domid))
        }
        for connection in connections.values where connection.domid == domid && domid != 0 { close(connection) }
    }

    private func accept(on listener: Int32, as caller: XenstoreCaller) {
        while true {
            let descriptor = Glibc.accept(listener, nil, nil)
            guard descriptor >= 0, fcntl(descriptor, F_SETFL, O_NONBLOCK) == 0,
                  fcntl(descriptor, F_SETFD, FD_CLOEXEC) == 0 else {
                if descriptor >= 0 { Glibc.close(descriptor) }
                if errno != EAGAIN && errno != EINTR { logger.warning("accept: \(SystemCallError(operation: "accept", errno: errno))") }
                return
            }
            let connection = Connection(descriptor: descriptor, id: xenstored.connect(caller), domid: caller.domid)
            connections[connection.id] = connection
            loop.register(descriptor) { [unowned self] events in self.service(connection, events) }
            logger.debug("\(caller) connected (connection \(connection.id))")
        }
    }

    // MARK: connections

    private func service(_ connection: Connection, _ events: EventLoop.Events) {
        if events.contains(.writable) { flush(connection) }
        guard connections[connection.id] != nil else { return }
        if events.contains(.readable) || events.contains(.hangup) || events.contains(.error) { receive(connection) }
    }

    private func receive(_ connection: Connection) {
        var buffer = [UInt8](repeating: 0, count: 16 << 10)
        let count = buffer.withUnsafeMutableBytes { read(connection.descriptor, $0.baseAddress, $0.count) }
        if count < 0 && (errno == EAGAIN || errno == EINTR) { return }
        guard count > 0 else {
            close(connection)
            return
        }
        connection.decoder.append(buffer[..<count])
        process(connection)
    }

    /// Handles the complete requests received so far, unless the client is not reading its
    /// replies (then they wait, and the socket is not read, until it does).
    private func process(_ connection: Connection) {
        while connections[connection.id] != nil && connection.pendingOutput < Self.inputPauseThreshold {
            let message: WireMessage
            do {
                guard let next = try connection.decoder.next() else { break }
                message = next
            } catch {
                // As xenstored: a payload above XENSTORE_PAYLOAD_MAX ends that client.
                logger.warning("dom\(connection.domid) connection \(connection.id): \(error); disconnecting")
                close(connection)
                return
            }
            deliver(xenstored.handle(message, from: connection.id))
        }
        updateInterest(connection)
    }

    private func deliver(_ deliveries: [Xenstored.Delivery]) {
        var touched: [Connection] = []
        for delivery in deliveries {
            guard let connection = connections[delivery.connection] else { continue }
            connection.output.append(contentsOf: delivery.message.encoded())
            if connection.pendingOutput > Self.maxPendingOutput {
                logger.warning("dom\(connection.domid) connection \(connection.id) does not read its replies; disconnecting")
                close(connection)
                continue
            }
            if !touched.contains(where: { $0 === connection }) { touched.append(connection) }
        }
        for connection in touched where connections[connection.id] != nil { flush(connection) }
    }

    private func flush(_ connection: Connection) {
        while connection.pendingOutput > 0 {
            let written = connection.output.withUnsafeBytes {
                send(connection.descriptor, $0.baseAddress! + connection.outputOffset, connection.pendingOutput, Int32(MSG_NOSIGNAL))
            }
            if written < 0 {
                if errno == EAGAIN || errno == EINTR { break }
                close(connection)
                return
            }
            connection.outputOffset += written
        }
        if connection.outputOffset == connection.output.count {
            connection.output.removeAll(keepingCapacity: connection.output.capacity <= 64 << 10)
            connection.outputOffset = 0
        }
        // Requests held back while the client was not reading can go on now.
        if connection.pendingOutput < Self.inputPauseThreshold && connection.decoder.pendingCount >= WireMessage.headerSize {
            process(connection)
        } else {
            updateInterest(connection)
        }
    }

    private func updateInterest(_ connection: Connection) {
        guard connections[connection.id] != nil else { return }
        var events: EventLoop.Events = []
        if connection.pendingOutput < Self.inputPauseThreshold { events.insert(.readable) }
        if connection.pendingOutput > 0 { events.insert(.writable) }
        loop.setEvents(events, for: connection.descriptor)
    }

    private func close(_ connection: Connection) {
        guard connections.removeValue(forKey: connection.id) != nil else { return }
        loop.unregister(connection.descriptor)
        Glibc.close(connection.descriptor)
        xenstored.disconnect(connection.id)
        logger.debug("dom\(connection.domid) connection \(connection.id) closed")
    }
}
