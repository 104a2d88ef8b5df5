import Blkif
import CHypervisorShim  // <sys/socket.h>: SOCK_* are not visible through Glibc in release (WMO) builds
import Glibc
import Hypervisor
import SimHypervisor
import Xenbus

extension SimLayout {
    /// The socket files currently in the directory (dom0's and every guest's).
    public func socketFiles() -> [String] {
        guard let dir = opendir(directory) else { return [] }
        defer { closedir(dir) }
        var result: [String] = []
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if name == "xenstored.sock" || (name.hasPrefix("dom") && name.hasSuffix(".sock")) {
                result.append(directory + "/" + name)
            }
        }
        return result
    }
}

/// Unix stream sockets, non-blocking and close-on-exec.
enum UnixSocket {
    private static func address(_ path: String) throws -> sockaddr_un {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        let capacity = MemoryLayout.size(ofValue: address.sun_path)
        guard bytes.count < capacity else { throw SystemCallError(operation: "socket path \(path) (longer than \(capacity - 1) bytes)", errno: ENAMETOOLONG) }
        withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: bytes) }
        return address
    }

    /// A listening socket at `path`; a stale socket file left by a dead simulator is replaced.
    static func listen(at path: String) throws -> Int32 {
        var address = try address(path)
        let descriptor = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard descriptor >= 0 else { throw SystemCallError(operation: "socket", errno: errno) }
        unlink(path)
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(descriptor, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard bound == 0, Glibc.listen(descriptor, 128) == 0 else {
            let error = errno
            close(descriptor)
            throw SystemCallError(operation: "listen on \(path)", errno: error)
        }
        return descriptor
    }

    /// Whether something accepts connections at `path` (a blocking probe, closed at once).
    static func accepts(at path: String) -> Bool {
        guard var address = try? address(path) else { return false }
        let descriptor = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard descriptor >= 0 else { return false }
        defer { close(descriptor) }
        return withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(descriptor, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        } == 0
    }
}

extension SimLayout {
    /// Whether a simulator answers on this directory's xenstored socket.
    public var isServing: Bool { UnixSocket.accepts(at: xenstoredSocket) }
}
