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
