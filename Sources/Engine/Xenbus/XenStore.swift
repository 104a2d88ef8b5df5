import CXenStore
import Glibc

/// A failed xenstore operation: which one, on which path, and the errno xenstored sent.
public struct XenStoreError: Error, CustomStringConvertible, Sendable {
    public let operation: String
    public let path: String
    public let errno: Int32

    public var isConflict: Bool { errno == EAGAIN }

    public var description: String {
        "xenstore \(operation) \(path): \(String(cString: strerror(errno)))"
    }
}

/// One access right in a node's permission list, as xenstored stores it ("n0", "r1", ...).
public struct XenStorePermission: Equatable, Sendable, CustomStringConvertible {
    public enum Access: Character, Sendable { case none = "n", read = "r", write = "w", both = "b" }
    public var domid: UInt32
    public var access: Access

    public init(domid: UInt32, access: Access) {
        self.domid = domid
        self.access = access
    }

    /// Parses xenstore-chmod's spelling, e.g. "r1" or "b0".
    public init?(_ text: some StringProtocol) {
        guard let first = text.first, let access = Access(rawValue: first),
              let domid = UInt32(text.dropFirst()) else { return nil }
        self.init(domid: domid, access: access)
    }

    public var description: String { "\(access.rawValue)\(domid)" }
}

/// An open xenstore transaction; `.none` means "outside any transaction" (XBT_NULL).
public struct XenStoreTransaction: Sendable, Equatable {
    public let id: UInt32
    public static let none = XenStoreTransaction(id: 0)
}

/// A watch firing: the path that changed (or the watched path itself at registration) and
/// the token given at registration.
public struct XenStoreWatchEvent: Sendable, Equatable {
    public let path: String
    public let token: String
}

/// A connection to xenstored through libxenstore. libxenstore chooses the socket the way every
/// Xen tool does (XENSTORED_PATH, XENSTORED_RUNDIR, /dev/xen/xenbus). The handle is safe to use
/// from several threads: libxenstore serialises requests on it.
public final class XenStore: @unchecked Sendable {
    private let handle: OpaquePointer

    /// Opens a connection; throws with errno when no xenstored answers.
    public init() throws {
        guard let handle = xs_open(0) else {
            throw XenStoreError(operation: "open", path: XenStore.socketDescription, errno: Glibc.errno)
        }
        self.handle = handle
    }

    deinit { xs_close(handle) }

    /// Where libxenstore will look, for error messages.
    public static var socketDescription: String {
        if let path = getenv("XENSTORED_PATH") { return String(cString: path) }
        if let dir = getenv("XENSTORED_RUNDIR") { return String(cString: dir) + "/socket" }
        return "/run/xenstored/socket or /dev/xen/xenbus"
    }

    private func failure(_ operation: String, _ path: String) -> XenStoreError {
        XenStoreError(operation: operation, path: path, errno: Glibc.errno)
    }

    // MARK: nodes

    /// The node's value, or nil when it does not exist.
    public func read(_ path: String, transaction: XenStoreTransaction = .none) throws -> String? {
        var length: UInt32 = 0
        guard let raw = xs_read(handle, transaction.id, path, &length) else {
            if Glibc.errno == ENOENT { return nil }
            throw failure("read", path)
        }
        defer { free(raw) }
        let bytes = UnsafeRawBufferPointer(start: raw, count: Int(length))
        return String(decoding: bytes, as: UTF8.self)
    }

    public func write(_ path: String, _ value: String, transaction: XenStoreTransaction = .none) throws {
        let ok = value.utf8.withContiguousStorageIfAvailable { bytes in
            xs_write(handle, transaction.id, path, bytes.baseAddress, UInt32(bytes.count))
        } ?? {
            var copy = value
            return copy.withUTF8 { xs_write(handle, transaction.id, path, $0.baseAddress, UInt32($0.count)) }
        }()
        if !ok { throw failure("write", path) }
    }

    public func mkdir(_ path: String, transaction: XenStoreTransaction = .none) throws {
        if !xs_mkdir(handle, transaction.id, path) { throw failure("mkdir", path) }
    }

    /// Removes the node and everything below it; a missing node is not an error.
    public func remove(_ path: String, transaction: XenStoreTransaction = .none) throws {
        if !xs_rm(handle, transaction.id, path), Glibc.errno != ENOENT { throw failure("rm", path) }
    }

    /// The names of the node's children, or nil when the node does not exist.
    public func directory(_ path: String, transaction: XenStoreTransaction = .none) throws -> [String]? {
        var count: UInt32 = 0
        guard let list = xs_directory(handle, transaction.id, path, &count) else {
            if Glibc.errno == ENOENT { return nil }
            throw failure("directory", path)
        }
        defer { free(list) }
        return (0..<Int(count)).map { String(cString: list[$0]!) }
    }

    public func permissions(_ path: String, transaction: XenStoreTransaction = .none) throws -> [XenStorePermission] {
        var count: UInt32 = 0
        guard let list = xs_get_permissions(handle, transaction.id, path, &count) else {
            throw failure("get-perms", path)
        }
        defer { free(list) }
        return (0..<Int(count)).map { index in
            let entry = list[index]
            let access: XenStorePermission.Access
            switch entry.perms & UInt32(XS_PERM_READ | XS_PERM_WRITE) {
            case UInt32(XS_PERM_READ): access = .read
            case UInt32(XS_PERM_WRITE): access = .write
            case UInt32(XS_PERM_READ | XS_PERM_WRITE): access = .both
            default: access = .none
            }
            return XenStorePermission(domid: entry.id, access: access)
        }
    }

    /// Sets the node's permissions: the first entry names the owner and everyone's default.
    public func setPermissions(_ path: String, _ permissions: [XenStorePermission],
                               transaction: XenStoreTransaction = .none) throws {
        var list = permissions.map { permission -> xs_permissions in
            let bits: Int32
            switch permission.access {
            case .none: bits = XS_PERM_NONE
            case .read: bits = XS_PERM_READ
            case .write: bits = XS_PERM_WRITE
            case .both: bits = XS_PERM_READ | XS_PERM_WRITE
            }
            return xs_permissions(id: permission.domid, perms: UInt32(bits))
        }
        if !xs_set_permissions(handle, transaction.id, path, &list, UInt32(list.count)) {
            throw failure("set-perms", path)
        }
    }

    /// The /local/domain/N path xenstored reports for a domain.
    public func domainPath(_ domid: UInt32) throws -> String {
        guard let raw = xs_get_domain_path(handle, domid) else { throw failure("get-domain-path", "\(domid)") }
        defer { free(raw) }
        return String(cString: raw)
    }

    // MARK: transactions

    public func startTransaction() throws -> XenStoreTransaction {
        let id = xs_transaction_start(handle)
        if id == 0 { throw failure("transaction-start", "/") }
        return XenStoreTransaction(id: id)
    }

    /// Commits (or aborts); a commit that conflicts with another writer throws `isConflict`.
    public func endTransaction(_ transaction: XenStoreTransaction, abort: Bool = false) throws {
        if !xs_transaction_end(handle, transaction.id, abort) { throw failure("transaction-end", "/") }
    }

    /// Runs `body` in a transaction and commits it, starting over when the commit conflicts
    /// (EAGAIN), as every xenstore client must. An error thrown by `body` aborts.
    public func transaction<T>(maxAttempts: Int = 64, _ body: (XenStoreTransaction) throws -> T) throws -> T {
        var attempt = 0
        while true {
            attempt += 1
            let transaction = try startTransaction()
            let result: T
            do {
                result = try body(transaction)
            } catch {
                try? endTransaction(transaction, abort: true)
                throw error
            }
            do {
                try endTransaction(transaction)
                return result
            } catch let error as XenStoreError where error.isConflict && attempt < maxAttempts {
                continue
            }
        }
    }

    // MARK: watches

    /// Registers a watch; xenstored fires it once now and on every change at or below `path`.
    public func watch(_ path: String, token: String) throws {
        if !xs_watch(handle, path, token) { throw failure("watch", path) }
    }

    public func unwatch(_ path: String, token: String) throws {
        if !xs_unwatch(handle, path, token) { throw failure("unwatch", path) }
    }

    /// A descriptor that polls readable while watch events are queued, so one event loop can
    /// wait on xenstore together with everything else.
    public var watchDescriptor: Int32 { xs_fileno(handle) }

    /// Takes the queued watch events without blocking.
    public func pendingWatchEvents() -> [XenStoreWatchEvent] {
        var events: [XenStoreWatchEvent] = []
        while let vector = xs_check_watch(handle) {
            defer { free(vector) }
            events.append(XenStoreWatchEvent(path: String(cString: vector[Int(XS_WATCH_PATH.rawValue)]!),
                                             token: String(cString: vector[Int(XS_WATCH_TOKEN.rawValue)]!)))
        }
        return events
    }

    /// Blocks until at least one watch event is queued, then returns all queued ones.
    public func waitForWatchEvents(timeoutMilliseconds: Int32 = -1) -> [XenStoreWatchEvent] {
        var descriptor = pollfd(fd: watchDescriptor, events: Int16(POLLIN), revents: 0)
        _ = poll(&descriptor, 1, timeoutMilliseconds)
        return pendingWatchEvents()
    }

    // MARK: domains (toolstack side)

    /// Tells xenstored a domain exists (the toolstack's XS_INTRODUCE).
    public func introduceDomain(_ domid: UInt32, mfn: UInt, eventChannel: UInt32) throws {
        if !xs_introduce_domain(handle, domid, mfn, eventChannel) { throw failure("introduce", "\(domid)") }
    }

    public func releaseDomain(_ domid: UInt32) throws {
        if !xs_release_domain(handle, domid) { throw failure("release", "\(domid)") }
    }

    public func isDomainIntroduced(_ domid: UInt32) -> Bool { xs_is_domain_introduced(handle, domid) }
}
