import Engine
import Glibc
import SimHypervisor
import Testing
import XenSim

/// Interdomain event channels through a broker on its own thread; each SimEventChannels is a
/// separate connection, i.e. what a separate process would hold.
@Suite(.serialized) struct HypervisorEventChannelTests {
    let dir = SimDirectory()

    init() throws {
        try SimDomain.createDomain(directory: dir.path, domid: 1, memoryMB: 1)
        try SimDomain.createDomain(directory: dir.path, domid: 2, memoryMB: 1)
    }

    /// Frontend (dom1) allocates, backend (dom0) binds: returns (guest, guestPort, backend, backendPort).
    func connect() throws -> (SimEventChannels, UInt32, SimEventChannels, UInt32) {
        let guest = try GuestEventChannels(directory: dir.path, domain: 1)
        let guestPort = try guest.allocUnbound(remoteDomain: 0)
        let backend = try SimEventChannels(directory: dir.path, domain: 0)
        let backendPort = try backend.bindInterdomain(remoteDomain: 1, remotePort: guestPort)
        return (guest, guestPort, backend, backendPort)
    }

    @Test func notifyBothWaysWakesTheOtherSide() throws {
        let broker = try BrokerThread(directory: dir.path)
        defer { broker.stop(); dir.remove() }
        let (guest, guestPort, backend, backendPort) = try connect()
        // Xen leaves the freshly bound local port pending.
        #expect(readable(backend.fileDescriptor, within: 30_000))
        #expect(try backend.pending() == [backendPort])
        try backend.unmask(backendPort)
        #expect(!readable(backend.fileDescriptor, within: 0))

        // The guest's fd may wake once for the broker's "bound" message; pending() absorbs it.
        #expect(try guest.pending() == [])
        #expect(!readable(guest.fileDescriptor, within: 0))
        try backend.notify(backendPort)
        #expect(readable(guest.fileDescriptor, within: 30_000))
        #expect(try guest.pending() == [guestPort])
        try guest.unmask(guestPort)
        #expect(try guest.pending() == [])

        try guest.notify(guestPort)
        #expect(readable(backend.fileDescriptor, within: 30_000))
        #expect(try backend.pending() == [backendPort])
        try backend.unmask(backendPort)
    }

    @Test func reportedPortStaysMaskedUntilUnmask() throws {
        let broker = try BrokerThread(directory: dir.path)
        defer { broker.stop(); dir.remove() }
        let (guest, guestPort, backend, backendPort) = try connect()
        _ = try backend.pending()  // the bind's own event; leaves the port masked
        try guest.notify(guestPort)
        try guest.notify(guestPort)
        #expect(!readable(backend.fileDescriptor, within: 100))
        #expect(try backend.pending() == [])
        try backend.unmask(backendPort)
        #expect(readable(backend.fileDescriptor, within: 30_000))
        #expect(try backend.pending() == [backendPort])  // two notifies, one event: a pending bit
    }

    @Test func onlyTheNamedDomainMayBind() throws {
        let broker = try BrokerThread(directory: dir.path)
        defer { broker.stop(); dir.remove() }
        let guest = try GuestEventChannels(directory: dir.path, domain: 1)
        let port = try guest.allocUnbound(remoteDomain: 0)
        let intruder = try SimEventChannels(directory: dir.path, domain: 2)
        #expect(throws: HypervisorError.eventChannel(operation: "bind_interdomain to domain 1", port: port, errno: EINVAL)) {
            _ = try intruder.bindInterdomain(remoteDomain: 1, remotePort: port)
        }
        // Unknown domain and unknown port.
        let backend = try SimEventChannels(directory: dir.path, domain: 0)
        #expect(throws: HypervisorError.eventChannel(operation: "bind_interdomain to domain 9", port: 1, errno: ESRCH)) {
            _ = try backend.bindInterdomain(remoteDomain: 9, remotePort: 1)
        }
        #expect(throws: HypervisorError.eventChannel(operation: "bind_interdomain to domain 1", port: 77, errno: EINVAL)) {
            _ = try backend.bindInterdomain(remoteDomain: 1, remotePort: 77)
        }
        // The rightful backend still binds, and only once.
        _ = try backend.bindInterdomain(remoteDomain: 1, remotePort: port)
        #expect(throws: HypervisorError.self) { _ = try backend.bindInterdomain(remoteDomain: 1, remotePort: port) }
        // The intruder cannot notify or unbind ports it does not hold.
        #expect(throws: HypervisorError.self) { try intruder.notify(port) }
        #expect(throws: HypervisorError.self) { try intruder.unbind(port) }
    }

    @Test func unbindRevertsThePeerToUnbound() throws {
        let broker = try BrokerThread(directory: dir.path)
        defer { broker.stop(); dir.remove() }
        let (guest, guestPort, backend, backendPort) = try connect()
        try backend.unbind(backendPort)
        #expect(throws: HypervisorError.eventChannel(operation: "notify", port: backendPort, errno: EINVAL)) {
            try backend.notify(backendPort)
        }
        // The guest's port is unbound again: notify is dropped silently, as on Xen.
        try guest.notify(guestPort)
        #expect(try backend.pending().isEmpty)
        // The backend can bind the same guest port again.
        let again = try backend.bindInterdomain(remoteDomain: 1, remotePort: guestPort)
        _ = try backend.pending()
        try backend.unmask(again)
        try guest.notify(guestPort)
        #expect(readable(backend.fileDescriptor, within: 30_000))
        #expect(try backend.pending() == [again])
    }

    @Test func closingTheConnectionClosesItsPorts() throws {
        let broker = try BrokerThread(directory: dir.path)
        defer { broker.stop(); dir.remove() }
        let guest = try GuestEventChannels(directory: dir.path, domain: 1)
        let guestPort = try guest.allocUnbound(remoteDomain: 0)
        do {
            let backend = try SimEventChannels(directory: dir.path, domain: 0)
            _ = try backend.bindInterdomain(remoteDomain: 1, remotePort: guestPort)
        }  // backend process "exits"
        let replacement = try SimEventChannels(directory: dir.path, domain: 0)
        var bound: UInt32?
        // The broker notices the hang-up asynchronously: retry until it has.
        #expect(eventually {
            bound = try? replacement.bindInterdomain(remoteDomain: 1, remotePort: guestPort)
            return bound != nil
        })
    }

    @Test func destroyedDomainLosesItsSocketAndChannels() throws {
        let broker = try BrokerThread(directory: dir.path)
        defer { broker.stop(); dir.remove() }
        let (guest, guestPort, backend, backendPort) = try connect()
        _ = guest
        _ = try backend.pending()
        try backend.unmask(backendPort)
        try SimDomain.destroyDomain(directory: dir.path, domid: 1)
        try broker.broker.syncDomains()
        #expect(access(SimLayout(directory: dir.path).eventChannelSocket(1), F_OK) != 0)
        #expect(throws: HypervisorError.self) { _ = try GuestEventChannels(directory: dir.path, domain: 1) }
        _ = guestPort
        // The backend's port is unbound now: its notify is dropped, not an error.
        try backend.notify(backendPort)
    }
}
