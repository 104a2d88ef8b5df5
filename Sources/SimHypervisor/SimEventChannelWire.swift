import CHypervisorShim
import Glibc
import Hypervisor

/// One message between a domain and the simulator's event-channel broker over the domain's
/// SOCK_SEQPACKET socket (DIR/evtchn/dom<N>.sock): four little-endian u32 words.
///
///     request          port        domain        reply (op | replyBit)
///     allocUnbound     -           remote domid  port, status
///     bindInterdomain  remote port remote domid  port, status; fds [wait, notify-peer]
///     unbind           local port  -             status
///     bound (push)     local port  -             fds [wait, notify-peer]: our unbound port got bound
///     peerClosed (push) local port -             the peer closed; our port is unbound again
public struct SimEventChannelMessage: Equatable, Sendable {
    public enum Operation: UInt32, Sendable {
        case allocUnbound = 1, bindInterdomain = 2, unbind = 3
        case bound = 100, peerClosed = 101
    }
    public static let replyBit: UInt32 = 0x8000_0000
    public static let size = 16
    /// Xen's DOMID_SELF.
    public static let domidSelf: UInt32 = 0x7FF0

    public var operation: UInt32
    public var port: UInt32
    public var domain: UInt32
    /// 0 or an errno (replies only).
    public var status: Int32

    public init(_ operation: Operation, port: UInt32 = 0, domain: UInt32 = 0) {
        self.init(raw: operation.rawValue, port: port, domain: domain, status: 0)
    }

    public init(raw operation: UInt32, port: UInt32, domain: UInt32, status: Int32) {
        self.operation = operation
        self.port = port
        self.domain = domain
        self.status = status
    }

    public func reply(port: UInt32 = 0, status: Int32 = 0) -> SimEventChannelMessage {
        SimEventChannelMessage(raw: operation | Self.replyBit, port: port, domain: domain, status: status)
    }

    var words: [UInt32] { [operation, port, domain, UInt32(bitPattern: status)] }
}

/// Sending and receiving wire messages with attached descriptors.
public enum SimEventChannelWire {
    /// Sends without blocking; returns 0 or the errno.
    public static func send(_ message: SimEventChannelMessage, fds: [Int32] = [], on socket: Int32) -> Int32 {
        let words = message.words.map { $0.littleEndian }
        let sent = words.withUnsafeBytes { bytes in
            fds.withUnsafeBufferPointer { fdBuffer in
                hv_send_with_fds(socket, bytes.baseAddress, bytes.count, fdBuffer.baseAddress, Int32(fds.count))
            }
        }
        return sent == SimEventChannelMessage.size ? 0 : (sent < 0 ? Glibc.errno : EMSGSIZE)
    }

    public enum Received {
        case message(SimEventChannelMessage, fds: [Int32])
        /// Nothing to read now (non-blocking only).
        case empty
        /// The peer closed, or sent something that is not a message (its fds were closed).
        case closed
    }

    /// Receives one message; a malformed one counts as closed, so a hostile peer is dropped.
    public static func receive(on socket: Int32, blocking: Bool) -> Received {
        var words = [UInt32](repeating: 0, count: 4)
        var fds = [Int32](repeating: -1, count: 4)
        var count: Int32 = 0
        var n: Int
        repeat {
            n = words.withUnsafeMutableBytes { bytes in
                fds.withUnsafeMutableBufferPointer { fdBuffer in
                    hv_recv_with_fds(socket, bytes.baseAddress, bytes.count, fdBuffer.baseAddress, &count,
                                     blocking ? 0 : Int32(MSG_DONTWAIT))
                }
            }
        } while n < 0 && Glibc.errno == EINTR
        let received = Array(fds.prefix(Int(count)))
        if n < 0 && (Glibc.errno == EAGAIN || Glibc.errno == EWOULDBLOCK) { return .empty }
        guard n == SimEventChannelMessage.size else {
            received.forEach { close($0) }
            return .closed
        }
        let w = words.map { UInt32(littleEndian: $0) }
        return .message(SimEventChannelMessage(raw: w[0], port: w[1], domain: w[2], status: Int32(bitPattern: w[3])),
                        fds: received)
    }

    /// Fills a sockaddr_un for `path`; nil if the path does not fit.
    public static func withAddress<T>(_ path: String, _ body: (UnsafePointer<sockaddr>, socklen_t) -> T) -> T? {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        let capacity = MemoryLayout.size(ofValue: address.sun_path)
        guard bytes.count < capacity else { return nil }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        return withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
    }
}
