@testable import DataPlane
import Engine
import Glibc
import Testing

/// io_uring refusing a submission for good (not EAGAIN/EBUSY): the requests it held are
/// answered with an error and the rings still release, instead of waiting forever.
@Suite(.serialized) struct SubmissionFaultTests {
    @Test(arguments: [EFAULT, EBADR, ENXIO])
    func refusedSubmissionsAreAnsweredAndTheRingsRelease(errno: Int32) throws {
        let guest = try DataPathGuest(imageSectors: 64)
        defer { guest.remove() }
        let rings = try guest.connect()
        let page = try guest.grantPages(1, readOnly: false)
        // Served before the fault.
        #expect(try guest.roundTrip(guest.readWrite(.read, sector: 0, refs: page.refs))?.status == .okay)
        try #require(rings as? ConnectedVBD).failSubmissions(1, errno: errno)
        let requests = (0..<4).map { guest.readWrite(.read, sector: UInt64($0 * 8), refs: page.refs) }
        try guest.submit(requests)
        let answers = try guest.responses(requests.count)
        #expect(Set(answers.map(\.id)) == Set(requests.map(\.id)))
        #expect(answers.allSatisfy { $0.status == .error }, "\(answers)")
        #expect(eventually { rings.statistics.inflight == 0 })
        #expect(eventually { rings.disconnect() })
        try guest.release(page)
    }
}

/// A ring whose frontend broke the protocol is halted, and says so to the control plane.
@Suite(.serialized) struct HaltedRingTests {
    @Test func aBogusRequestProducerHaltsTheRingAndIsCounted() throws {
        let guest = try DataPathGuest(imageSectors: 64)
        defer { guest.remove() }
        let rings = try guest.connect()
        let page = try guest.grantPages(1, readOnly: false)
        #expect(try guest.roundTrip(guest.readWrite(.read, sector: 0, refs: page.refs))?.status == .okay)
        #expect(rings.haltReason == nil && rings.statistics.haltedRings == 0)
        // req_prod 2^31 entries past what was answered: a producer no ring can have.
        let shared = guest.front.shared
        shared.memory.storeBytes(of: shared.responseProducer &+ 0x8000_0000, toByteOffset: 0, as: RingIndex.self)
        try guest.events.notify(guest.port)
        #expect(eventually { rings.statistics.haltedRings == 1 })
        #expect(rings.haltReason?.hasPrefix("queue 0: frontend broke the ring protocol") == true, "\(String(describing: rings.haltReason))")
        #expect(eventually { rings.disconnect() })
        try guest.release(page)
    }
}
