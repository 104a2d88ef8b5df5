import CXenEvtchn
import Glibc

/// Event channels on real Xen through libxenevtchn (/dev/xen/evtchn). The device masks a
/// port when it reports it; `unmask` re-arms it.
public final class XenEventChannels: EventChannels, @unchecked Sendable {
    private let handle: OpaquePointer

    public init() throws {
        guard let handle = xenevtchn_open(nil, 0) else {
            throw HypervisorError.deviceUnavailable(device: "/dev/xen/evtchn", errno: Glibc.errno, module: "xen-evtchn")
        }
        self.handle = handle
        // pending() drains until the device has nothing more: it must not block.
        let fd = xenevtchn_fd(handle)
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
    }

    deinit { xenevtchn_close(handle) }

    public var fileDescriptor: Int32 { xenevtchn_fd(handle) }

    public func bindInterdomain(remoteDomain: UInt32, remotePort: UInt32) throws -> UInt32 {
        let port = xenevtchn_bind_interdomain(handle, remoteDomain, remotePort)
        guard port >= 0 else {
            throw HypervisorError.eventChannel(operation: "bind_interdomain to domain \(remoteDomain)",
                                               port: remotePort, errno: Glibc.errno)
        }
        return UInt32(port)
    }

    public func notify(_ localPort: UInt32) throws {
        guard xenevtchn_notify(handle, localPort) == 0 else {
            throw HypervisorError.eventChannel(operation: "notify", port: localPort, errno: Glibc.errno)
        }
    }

    public func unbind(_ localPort: UInt32) throws {
        guard xenevtchn_unbind(handle, localPort) == 0 else {
            throw HypervisorError.eventChannel(operation: "unbind", port: localPort, errno: Glibc.errno)
        }
    }

    public func pending() throws -> [UInt32] {
        var ports: [UInt32] = []
        while true {
            let port = xenevtchn_pending(handle)
            if port >= 0 { ports.append(UInt32(port)); continue }
            let error = Glibc.errno
            if error == EAGAIN || error == EWOULDBLOCK { return ports }
            if error == EINTR { continue }
            throw HypervisorError.eventChannel(operation: "pending", port: 0, errno: error)
        }
    }

    public func unmask(_ localPort: UInt32) throws {
        guard xenevtchn_unmask(handle, localPort) == 0 else {
            throw HypervisorError.eventChannel(operation: "unmask", port: localPort, errno: Glibc.errno)
        }
    }
}
