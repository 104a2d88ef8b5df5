import Blkif
import Hypervisor
import SimHypervisor
import Xenbus

/// The errno names xenstored answers with (xs_wire.h's xsd_errors); the raw value is what
/// travels in an XS_ERROR payload.
public enum XenstoreErrno: String, Error, Sendable {
    case einval = "EINVAL"
    case eacces = "EACCES"
    case eexist = "EEXIST"
    case eisdir = "EISDIR"
    case enoent = "ENOENT"
    case enomem = "ENOMEM"
    case enospc = "ENOSPC"
    case eio = "EIO"
    case enosys = "ENOSYS"
    case ebusy = "EBUSY"
    case eagain = "EAGAIN"
    case e2big = "E2BIG"
    case eperm = "EPERM"
}

/// Who sends a request: the domain a connection belongs to. Connections on the dom0 socket
/// are privileged (the toolstack's view); guest sockets are not.
public struct XenstoreCaller: Hashable, Sendable, CustomStringConvertible {
    public let domid: UInt32
    public let isPrivileged: Bool

    public init(domid: UInt32, isPrivileged: Bool) {
        self.domid = domid
        self.isPrivileged = isPrivileged
    }

    public static let dom0 = XenstoreCaller(domid: 0, isPrivileged: true)
    public static func guest(_ domid: UInt32) -> XenstoreCaller { XenstoreCaller(domid: domid, isPrivileged: false) }

    /// /local/domain/N: where this caller's relative paths live.
    public var domainPath: String { "/local/domain/\(domid)" }
    public var description: String { "dom\(domid)" }
}

/// What a caller may do on a node (XS_PERM_READ, XS_PERM_WRITE, XS_PERM_OWNER).
struct Rights: OptionSet {
    let rawValue: UInt8
    static let read = Rights(rawValue: 1)
    static let write = Rights(rawValue: 2)
    static let owner = Rights(rawValue: 4)
    static let all: Rights = [.read, .write, .owner]

    init(rawValue: UInt8) { self.rawValue = rawValue }

    init(_ access: XenStorePermission.Access) {
        switch access {
        case .none: self = []
        case .read: self = .read
        case .write: self = .write
        case .both: self = [.read, .write]
        }
    }
}

extension XenstoreCaller {
    /// xenstored's perm_for_conn: privileged callers and the owner (first entry) get
    /// everything, a domain acting for `target` gets what the target gets; otherwise the
    /// first entry naming the caller, else the first entry's default for everyone.
    func rights(on permissions: [XenStorePermission], target: UInt32? = nil) -> Rights {
        guard let first = permissions.first else { return isPrivileged ? .all : [] }
        func matches(_ domid: UInt32) -> Bool { domid == self.domid || domid == target }
        if isPrivileged || matches(first.domid) { return .all }
        if let entry = permissions.dropFirst().first(where: { matches($0.domid) }) {
            return Rights(entry.access)
        }
        return Rights(first.access)
    }
}
