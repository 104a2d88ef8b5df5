internal import CNBD
import Dispatch
import Glibc

/// What libnbd reported when a call failed: its errno (EIO when it gave none) and its
/// message, prefixed with what was being done.
public struct NBDError: Error, CustomStringConvertible, Sendable {
    public let errno: Int32
    public let message: String
    public var description: String { message }

    public init(errno: Int32, message: String) {
        self.errno = errno
        self.message = message
    }

    /// The calling thread's last libnbd error.
    static func last(_ what: String) -> NBDError {
        let code = nbd_get_errno()
        let text = nbd_get_error().map { String(cString: $0) } ?? String(cString: strerror(code == 0 ? EIO : code))
        return NBDError(errno: code == 0 ? EIO : code, message: "\(what): \(text)")
    }
}

/// What the server said of its export in the handshake.
public struct NBDExportInfo: Sendable, Equatable {
    public var size: UInt64
    public var readOnly: Bool
    public var canFlush: Bool
    public var canTrim: Bool
    /// Flush on one connection covers writes answered on every other (NBD_FLAG_CAN_MULTI_CONN).
    public var canMultiConn: Bool
    /// NBD_INFO_BLOCK_SIZE; 0 where the server gave none.
    public var minimumBlockSize: UInt32
    public var preferredBlockSize: UInt32
    public var maximumBlockSize: UInt32

    public init(size: UInt64, readOnly: Bool, canFlush: Bool, canTrim: Bool, canMultiConn: Bool,
                minimumBlockSize: UInt32, preferredBlockSize: UInt32, maximumBlockSize: UInt32) {
        self.size = size
        self.readOnly = readOnly
        self.canFlush = canFlush
        self.canTrim = canTrim
        self.canMultiConn = canMultiConn
        self.minimumBlockSize = minimumBlockSize
        self.preferredBlockSize = preferredBlockSize
        self.maximumBlockSize = maximumBlockSize
    }
}

/// Which way the connection waits for its socket (nbd_aio_get_direction).
public struct NBDDirection: OptionSet, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let read = NBDDirection(rawValue: UInt32(LIBNBD_AIO_DIRECTION_READ))
    public static let write = NBDDirection(rawValue: UInt32(LIBNBD_AIO_DIRECTION_WRITE))
}

/// One libnbd handle: one connection to an NBD server. Driven by one thread at a time: the
/// caller polls `fileDescriptor` in `direction` and calls `notify`; commands are issued with
/// the aio calls and retired with `retireCompleted`, never through callbacks.
public final class NBDConnection {
    private let handle: OpaquePointer
    /// Commands issued and not yet retired.
    private var unretired = 0

    /// `name` appears in libnbd's debug output.
    public init(name: String) throws(NBDError) {
        guard let handle = nbd_create() else { throw NBDError.last("creating an NBD handle") }
        self.handle = handle
        _ = nbd_set_handle_name(handle, name)
        // URIs come from the toolstack (params), which may name a TLS key file in them.
        _ = nbd_set_uri_allow_local_file(handle, true)
        // libnbd zeroes every read buffer first by default; a read's data is used only when
        // the whole read succeeded, and the zeroing cost as much as the read (1M reads).
        _ = nbd_set_pread_initialize(handle, false)
        // Simple replies: a read's answer is a 16-byte header and the data, two recv calls
        // for libnbd. A structured one takes four (header, its rest, the chunk's offset, the
        // data), and what it adds (holes in sparse reads, block status) the data path never
        // asks for (measured: recv took a third of the ring thread's CPU at four per read).
        _ = nbd_set_request_structured_replies(handle, false)
    }

    deinit { nbd_close(handle) }

    /// Whether libnbd takes `uri` (nbd://, nbds://, nbd+unix://, nbds+unix://, nbd+vsock://).
    public static func isURI(_ text: some StringProtocol) -> Bool {
        ["nbd://", "nbds://", "nbd+unix://", "nbds+unix://", "nbd+vsock://", "nbds+vsock://"].contains { text.hasPrefix($0) }
    }

    /// Connects and negotiates, blocking for at most `timeout` seconds (nbd_connect_uri has
    /// no deadline of its own: a silent host would hold the caller for minutes).
    public func connect(uri: String, timeout: Double) throws(NBDError) {
        try startConnecting(uri: uri)
        let deadline = DispatchTime.now().uptimeNanoseconds + UInt64(max(0, timeout) * 1e9)
        while !isReady {
            guard !isDead else { throw NBDError.last("connecting to \(uri)") }
            let now = DispatchTime.now().uptimeNanoseconds
            guard now < deadline, fileDescriptor != nil else {
                throw NBDError(errno: ETIMEDOUT, message: "connecting to \(uri): no answer within \(timeout) s")
            }
            try notify(try readiness(of: direction, withinMilliseconds: Int32(min(1000, (deadline - now) / 1_000_000 + 1))))
        }
    }

    /// Starts connecting (nbd_aio_connect_uri); `notify` drives it on until `isReady` or `isDead`.
    public func startConnecting(uri: String) throws(NBDError) {
        guard nbd_aio_connect_uri(handle, uri) == 0 else { throw NBDError.last("connecting to \(uri)") }
    }

    /// The export as negotiated. Only once connected.
    public func exportInfo() throws(NBDError) -> NBDExportInfo {
        func flag(_ value: Int32, _ what: String) throws(NBDError) -> Bool {
            guard value >= 0 else { throw NBDError.last("asking the server whether it \(what)") }
            return value == 1
        }
        func blockSize(_ kind: Int32) -> UInt32 {
            UInt32(clamping: max(0, nbd_get_block_size(handle, kind)))
        }
        let size = nbd_get_size(handle)
        guard size >= 0 else { throw NBDError.last("reading the export's size") }
        return NBDExportInfo(
            size: UInt64(size),
            readOnly: try flag(nbd_is_read_only(handle), "is read-only"),
            canFlush: try flag(nbd_can_flush(handle), "flushes"),
            canTrim: try flag(nbd_can_trim(handle), "trims"),
            canMultiConn: try flag(nbd_can_multi_conn(handle), "is consistent across connections"),
            minimumBlockSize: blockSize(Int32(LIBNBD_SIZE_MINIMUM)),
            preferredBlockSize: blockSize(Int32(LIBNBD_SIZE_PREFERRED)),
            maximumBlockSize: blockSize(Int32(LIBNBD_SIZE_MAXIMUM)))
    }

    /// The socket, once connecting has started; nil before.
    public var fileDescriptor: Int32? {
        let descriptor = nbd_aio_get_fd(handle)
        return descriptor >= 0 ? descriptor : nil
    }

    public var direction: NBDDirection { NBDDirection(rawValue: nbd_aio_get_direction(handle)) }

    /// What the socket is ready for, of `wanted`, within `milliseconds` (0: now); hangups and
    /// errors count as readable, as libnbd then reads to find out.
    public func readiness(of wanted: NBDDirection, withinMilliseconds milliseconds: Int32 = 0) throws(NBDError) -> NBDDirection {
        guard let descriptor = fileDescriptor, !wanted.isEmpty else { return [] }
        var events: Int16 = 0
        if wanted.contains(.read) { events |= Int16(POLLIN) }
        if wanted.contains(.write) { events |= Int16(POLLOUT) }
        var entry = pollfd(fd: descriptor, events: events, revents: 0)
        let ready = poll(&entry, 1, milliseconds)
        if ready < 0, Glibc.errno != EINTR { throw NBDError(errno: Glibc.errno, message: "polling the NBD socket failed") }
        guard ready > 0 else { return [] }
        var fired: NBDDirection = []
        if entry.revents & Int16(POLLIN | POLLHUP | POLLERR) != 0 { fired.insert(.read) }
        if entry.revents & Int16(POLLOUT | POLLERR) != 0 { fired.insert(.write) }
        return fired.intersection(wanted)
    }

    /// Replies read in one `notify` at most.
    static let maxRepliesPerNotify = 64

    /// The socket is readable / writable: let libnbd's state machine go on until it would block.
    /// libnbd stops after each whole reply; while replies keep completing and it waits only to
    /// read, reading goes on, so a burst of answers costs the caller one wakeup rather than one
    /// each (never while it also waits to write, so a command being sent is never paused).
    ///
    /// libnbd takes a read notification as a promise: finding nothing to read, it waits in
    /// REPLY.START, and a command issued meanwhile is only queued, to go out after the next
    /// reply; with no other command out, none comes, and the queued ones wait for good (seen:
    /// guest requests unanswered, the server idle). So the socket itself is asked before every
    /// read notification; a poll's result alone can be stale (io_uring reports the events of
    /// the wakeup, and the data may be gone by the time it is handled).
    public func notify(_ ready: NBDDirection) throws(NBDError) {
        if ready.contains(.read) {
            for _ in 0..<Self.maxRepliesPerNotify {
                guard try readiness(of: .read) == .read else { break }
                let before = nbd_aio_in_flight(handle)
                guard nbd_aio_notify_read(handle) == 0 else { throw NBDError.last("reading from the NBD server") }
                let after = nbd_aio_in_flight(handle)
                guard after < before, after > 0, direction == .read else { break }
            }
        }
        if ready.contains(.write), nbd_aio_notify_write(handle) != 0 { throw NBDError.last("writing to the NBD server") }
    }

    public var isReady: Bool { nbd_aio_is_ready(handle) == 1 || nbd_aio_is_processing(handle) == 1 }
    /// The connection failed or was lost; only a new handle connects again.
    public var isDead: Bool { nbd_aio_is_dead(handle) == 1 || nbd_aio_is_closed(handle) == 1 }

    /// NBD_CMD_READ of `count` bytes at `offset` into `buffer`, which must stay valid until
    /// the command is retired. The command's cookie.
    public func read(into buffer: UnsafeMutableRawPointer, count: Int, offset: UInt64) throws(NBDError) -> UInt64 {
        try cookie(cnbd_aio_pread(handle, buffer, count, offset), "reading \(count) bytes at byte \(offset)")
    }

    /// NBD_CMD_WRITE of `count` bytes from `buffer` (valid until retired) at `offset`.
    public func write(from buffer: UnsafeRawPointer, count: Int, offset: UInt64) throws(NBDError) -> UInt64 {
        try cookie(cnbd_aio_pwrite(handle, buffer, count, offset), "writing \(count) bytes at byte \(offset)")
    }

    public func flush() throws(NBDError) -> UInt64 {
        try cookie(cnbd_aio_flush(handle), "flushing")
    }

    public func trim(count: UInt64, offset: UInt64) throws(NBDError) -> UInt64 {
        try cookie(cnbd_aio_trim(handle, count, offset), "trimming \(count) bytes at byte \(offset)")
    }

    /// `what` is spelled out only on failure: commands go out per request.
    private func cookie(_ value: Int64, _ what: @autoclosure () -> String) throws(NBDError) -> UInt64 {
        guard value > 0 else { throw NBDError.last(what()) }
        unretired += 1
        return UInt64(value)
    }

    /// The next command the server has answered, retired: its cookie and 0, or the errno it
    /// failed with. nil while none has been answered.
    public func retireCompleted() -> (cookie: UInt64, error: Int32)? {
        // Answered = issued - still in flight. Asking libnbd to peek with none answered
        // costs an error message it formats (a vfprintf per wakeup).
        guard unretired > Int(max(0, nbd_aio_in_flight(handle))) else { return nil }
        let next = nbd_aio_peek_command_completed(handle)
        guard next > 0 else { return nil }
        unretired -= 1
        let status = nbd_aio_command_completed(handle, UInt64(next))
        if status == 1 { return (UInt64(next), 0) }
        let code = nbd_get_errno()
        return (UInt64(next), code == 0 ? EIO : code)
    }

}
