/// Interdomain event channels as a backend uses them (libxenevtchn's model): bind to the port
/// the frontend allocated, notify it, and learn which local ports fired by polling one fd.
/// The daemon opens one instance and shares it; `pending()` should be drained by one thread.
public protocol EventChannels: AnyObject, Sendable {
    /// Connects to `remotePort` of `remoteDomain` (which must have allocated it unbound for
    /// us); returns our local port. The new port starts pending, as on Xen.
    func bindInterdomain(remoteDomain: UInt32, remotePort: UInt32) throws -> UInt32
    /// Sends an event to the other end of `localPort`.
    func notify(_ localPort: UInt32) throws
    /// Closes `localPort`; the remote port reverts to unbound.
    func unbind(_ localPort: UInt32) throws
    /// Readable while some bound port has a pending, unmasked event.
    var fileDescriptor: Int32 { get }
    /// Local ports that fired since the last call (drains; never blocks). Each reported port
    /// is masked until `unmask` — always call it after handling, real Xen needs it.
    func pending() throws -> [UInt32]
    /// Re-enables delivery for `localPort`; an event that arrived meanwhile fires at once.
    func unmask(_ localPort: UInt32) throws
}

/// The hypervisor services a backend needs, opened once: real Xen, or the simulator's state
/// under `--sim DIR`.
public struct HypervisorServices: Sendable {
    public let grants: any GrantMapper
    public let eventChannels: any EventChannels
    /// Opens another event channel handle of the same kind. The data plane takes one per ring,
    /// as the kernel gives each ring its own interrupt: each worker waits on its own fd and
    /// drains only its own port.
    public let openEventChannels: @Sendable () throws -> any EventChannels

    public init(grants: any GrantMapper, eventChannels: any EventChannels,
                openEventChannels: @escaping @Sendable () throws -> any EventChannels) {
        self.grants = grants
        self.eventChannels = eventChannels
        self.openEventChannels = openEventChannels
    }

    /// `simulatorDirectory` nil → /dev/xen/gntdev and /dev/xen/evtchn; else the simulator
    /// in that directory, acting as `localDomain` (the backend's domid, normally 0).
    public static func open(simulatorDirectory: String?, localDomain: UInt32 = 0) throws -> HypervisorServices {
        if let dir = simulatorDirectory {
            return HypervisorServices(
                grants: SimGrantMapper(directory: dir, localDomain: localDomain),
                eventChannels: try SimEventChannels(directory: dir, domain: localDomain),
                openEventChannels: { try SimEventChannels(directory: dir, domain: localDomain) })
        }
        return HypervisorServices(grants: try XenGrantMapper(), eventChannels: try XenEventChannels(),
                                  openEventChannels: { try XenEventChannels() })
    }
}
