import Glibc
import Hypervisor

/// Where one simulator keeps its state: everything lives under the directory given to
/// `xensim run --dir DIR` (and `blkback-server --sim DIR`):
///
///     DIR/xenstored.sock            dom0's (privileged) xenstored socket (XENSTORED_PATH)
///     DIR/dom<N>.sock               domain N's xenstored socket, while N is introduced
///     DIR/xensim.pid, xensim.log    the running `xensim run` and its detached output
///     DIR/domains/<N>/memory        guest N's RAM: page-count × 4 KiB, shared by mmap
///     DIR/domains/<N>/grant-table   guest N's grant table: struct grant_entry_v1[entries]
///     DIR/domains/<N>/grant-active  hypervisor-private pin counts per ref (guest never maps it)
///     DIR/evtchn/dom<N>.sock        event-channel broker socket; connecting as N = being N
///     DIR/evtchn/dom<N>.news        u64 counting the broker's messages to domain N
public struct SimLayout: Sendable {
    public static let pageSize = 4096
    /// Xen's historical default max_grant_frames: 32 frames of 512 v1 entries.
    public static let grantTableFrames = 32
    public static let grantEntrySize = 8
    public static var grantEntries: Int { grantTableFrames * pageSize / grantEntrySize }

    public let directory: String

    public init(directory: String) { self.directory = directory }

    public var xenstoredSocket: String { "\(directory)/xenstored.sock" }
    public func guestSocket(_ domid: UInt32) -> String { "\(directory)/dom\(domid).sock" }
    public var pidFile: String { "\(directory)/xensim.pid" }
    public var logFile: String { "\(directory)/xensim.log" }
    public var domainsDirectory: String { "\(directory)/domains" }
    public func domainDirectory(_ domid: UInt32) -> String { "\(domainsDirectory)/\(domid)" }
    public func memory(_ domid: UInt32) -> String { "\(domainDirectory(domid))/memory" }
    public func grantTable(_ domid: UInt32) -> String { "\(domainDirectory(domid))/grant-table" }
    public func grantActive(_ domid: UInt32) -> String { "\(domainDirectory(domid))/grant-active" }
    public var eventChannelDirectory: String { "\(directory)/evtchn" }

    /// The names in `path` (not . and ..); empty when it cannot be read.
    public static func directoryEntries(_ path: String) -> [String] {
        guard let dir = opendir(path) else { return [] }
        defer { closedir(dir) }
        var names: [String] = []
        while let entry = readdir(dir) {
            let name = withUnsafePointer(to: entry.pointee.d_name) {
                $0.withMemoryRebound(to: CChar.self, capacity: 256) { String(cString: $0) }
            }
            if name != "." && name != ".." { names.append(name) }
        }
        return names
    }
    public func eventChannelSocket(_ domid: UInt32) -> String { "\(eventChannelDirectory)/dom\(domid).sock" }
    public func eventChannelNews(_ domid: UInt32) -> String { "\(eventChannelDirectory)/dom\(domid).news" }
}

/// A whole file mapped MAP_SHARED read-write: the way every simulator process sees the same
/// bytes (guest memory, grant tables, pin counts).
public final class SimSharedFile: @unchecked Sendable {
    public let path: String
    public let descriptor: Int32
    public let base: UnsafeMutableRawPointer
    public let size: Int
    public let inode: UInt64

    public init(path: String) throws {
        let fd = open(path, O_RDWR | O_CLOEXEC)
        guard fd >= 0 else { throw HypervisorError.simulatorUnavailable(path: path, errno: Glibc.errno) }
        var info = stat()
        guard fstat(fd, &info) == 0 else {
            let error = Glibc.errno
            close(fd)
            throw HypervisorError.simulatorUnavailable(path: path, errno: error)
        }
        guard info.st_size > 0 else {
            close(fd)
            throw HypervisorError.simulatorUnavailable(path: path, errno: EINVAL)
        }
        let mapped = mmap(nil, Int(info.st_size), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        guard let mapped, mapped != MAP_FAILED else {
            let error = Glibc.errno
            close(fd)
            throw HypervisorError.simulatorUnavailable(path: path, errno: error)
        }
        self.path = path
        descriptor = fd
        base = mapped
        size = Int(info.st_size)
        inode = UInt64(info.st_ino)
    }

    deinit {
        munmap(base, size)
        close(descriptor)
    }
}

extension HypervisorServices {
    /// The simulator's grant table and event channels in `directory`, acting as
    /// `localDomain` (the backend's domid, normally 0).
    public static func simulator(directory: String, localDomain: UInt32 = 0) throws -> HypervisorServices {
        _ = try SimEventChannels(directory: directory, domain: localDomain)
        return HypervisorServices(grants: SimGrantMapper(directory: directory, localDomain: localDomain),
                                  openEventChannels: { try SimEventChannels(directory: directory, domain: localDomain) })
    }
}
