import Engine
import Foundation
import Glibc
import SimHypervisor
import Testing
import XenSim

/// The data plane against a simulated guest in the same process: real grant mappings of the
/// guest's memory file, real event channels through a broker thread, real io_uring I/O on a
/// temp image.
@Suite(.serialized) struct DataPathTests {
    @Test func writeFlushReadBackAndUnknownOperation() throws {
        let guest = try DataPathGuest()
        defer { guest.remove() }
        let rings = try guest.connect()
        #expect(rings.features.flush && rings.features.barrier)
        #expect(!rings.features.persistentGrants)

        let source = try guest.grantPages(2, readOnly: true) { 0x40 + UInt8($0) }
        let write = guest.readWrite(.write, sector: 8, refs: source.refs)
        #expect(try guest.roundTrip(write) == BlkifResponse(answering: write, status: .okay))
        // Linux blkfront's flush carries sector_number (sector_t)-1 and no segments; scaling
        // it to a byte offset crashed the daemon on real Xen.
        let flush = BlkifRequest.readWrite(.init(operation: .flushDiskCache, id: guest.makeID(), sectorNumber: .max))
        #expect(try guest.roundTrip(flush)?.status == .okay)

        let image = try guest.image()
        #expect(image[8 * 512] == 0x40 && image[16 * 512 - 1] == 0x40 && image[16 * 512] == 0x41)
        #expect(image[24 * 512] == 0 && image[8 * 512 - 1] == 0)

        let target = try guest.grantPages(2, readOnly: false)
        // Partial segments: disk sectors 12...19 into sectors 2...5 of each page.
        let read = guest.readWrite(.read, sector: 12, refs: target.refs, firstSect: 2, lastSect: 5)
        #expect(try guest.roundTrip(read)?.status == .okay)
        let page0 = guest.memory.page(target.frames[0]), page1 = guest.memory.page(target.frames[1])
        #expect(page0.load(fromByteOffset: 1023, as: UInt8.self) == 0)
        #expect(page0.load(fromByteOffset: 1024, as: UInt8.self) == 0x40)
        #expect(page0.load(fromByteOffset: 3071, as: UInt8.self) == 0x40)
        #expect(page0.load(fromByteOffset: 3072, as: UInt8.self) == 0)
        // Disk sector 16 on came from the second source page.
        #expect(page1.load(fromByteOffset: 1024, as: UInt8.self) == 0x41)
        #expect(page1.load(fromByteOffset: 3071, as: UInt8.self) == 0x41)
        #expect(page1.load(fromByteOffset: 3072, as: UInt8.self) == 0)

        let unknown = BlkifRequest.other(operation: .unknown(9), id: guest.makeID())
        #expect(try guest.roundTrip(unknown) == BlkifResponse(id: unknown.id, operation: .unknown(9), status: .notSupported))

        // Every grant was unmapped before its response: the guest can revoke them all.
        try guest.release(source)
        try guest.release(target)

        let stats = rings.statistics
        #expect(stats.writeRequests == 1 && stats.readRequests == 1 && stats.flushRequests == 1)
        #expect(stats.writeSectors == 16 && stats.readSectors == 8)
        #expect(stats.errors == 1 && stats.inflight == 0 && stats.discardRequests == 0)
        #expect(stats.latency(.write).count == 1 && stats.latency(.read).count == 1 && stats.latency(.flush).count == 1)
        #expect(rings.disconnect())
    }

    @Test func badRequestsGetErrorsAndTheRingKeepsServing() throws {
        let guest = try DataPathGuest(imageSectors: 64)
        defer { guest.remove() }
        let rings = try guest.connect()

        // READ into a page granted read-only: the writable map is refused (XSA-362).
        let readOnlyPage = try guest.grantPages(1, readOnly: true)
        #expect(try guest.roundTrip(guest.readWrite(.read, sector: 0, refs: readOnlyPage.refs))?.status == .error)
        // Past the end of the 64-sector disk, and a grant ref that does not exist.
        let page = try guest.grantPages(1, readOnly: false)
        #expect(try guest.roundTrip(guest.readWrite(.read, sector: 60, refs: page.refs))?.status == .error)
        #expect(try guest.roundTrip(guest.readWrite(.read, sector: 0, refs: [999_999]))?.status == .error)
        // Reversed segment, and indirect with more segments than advertised.
        #expect(try guest.roundTrip(guest.readWrite(.read, sector: 0, refs: page.refs, firstSect: 5, lastSect: 2))?.status == .error)
        let tooMany = BlkifRequest.indirect(.init(indirectOperation: .read, nrSegments: 257, id: guest.makeID(),
                                                  sectorNumber: 0, indirectGrefs: [page.refs[0]]))
        #expect(try guest.roundTrip(tooMany) == BlkifResponse(id: tooMany.id, operation: .read, status: .error))
        // Secure discard is not offered.
        let secure = BlkifRequest.discard(.init(secure: true, id: guest.makeID(), sectorNumber: 0, nrSectors: 8))
        #expect(try guest.roundTrip(secure)?.status == .notSupported)

        // Still serving.
        #expect(try guest.roundTrip(guest.readWrite(.read, sector: 56, refs: page.refs))?.status == .okay)
        try guest.release(readOnlyPage)
        try guest.release(page)
        #expect(rings.statistics.errors == 6)
        #expect(rings.statistics.inflight == 0)
        #expect(rings.disconnect())
    }

    @Test func writesToAReadOnlyDeviceAreRefused() throws {
        let guest = try DataPathGuest(readOnly: true)
        defer { guest.remove() }
        let rings = try guest.connect()
        #expect(!rings.features.discard)
        let page = try guest.grantPages(1, readOnly: true) { _ in 0x77 }
        #expect(try guest.roundTrip(guest.readWrite(.write, sector: 0, refs: page.refs))?.status == .error)
        #expect(try guest.image().allSatisfy { $0 == 0 })
        try guest.release(page)
        #expect(rings.disconnect())
    }

    @Test func indirectWriteAndReadOf64Segments() throws {
        let guest = try DataPathGuest()
        defer { guest.remove() }
        let rings = try guest.connect()
        let data = try guest.grantPages(64, readOnly: true) { UInt8($0 + 1) }
        let indirectPage = try guest.grantPages(1, readOnly: true)
        BlkifIndirectPage.write(data.refs.map { BlkifSegment(gref: $0, firstSect: 0, lastSect: 7) },
                                to: guest.memory.page(indirectPage.frames[0]))
        let write = BlkifRequest.indirect(.init(indirectOperation: .write, nrSegments: 64, id: guest.makeID(),
                                                sectorNumber: 1024, indirectGrefs: [indirectPage.refs[0]]))
        // Answered with the inner operation, as Linux blkfront requires (found on real Xen:
        // "response has wrong operation (6 instead of 1)" disabled the disk).
        #expect(try guest.roundTrip(write) == BlkifResponse(id: write.id, operation: .write, status: .okay))
        let image = try guest.image()
        for index in 0..<64 { #expect(image[(1024 + index * 8) * 512 + 100] == UInt8(index + 1)) }

        let target = try guest.grantPages(64, readOnly: false)
        BlkifIndirectPage.write(target.refs.map { BlkifSegment(gref: $0, firstSect: 0, lastSect: 7) },
                                to: guest.memory.page(indirectPage.frames[0]))
        let read = BlkifRequest.indirect(.init(indirectOperation: .read, nrSegments: 64, id: guest.makeID(),
                                               sectorNumber: 1024, indirectGrefs: [indirectPage.refs[0]]))
        #expect(try guest.roundTrip(read) == BlkifResponse(id: read.id, operation: .read, status: .okay))
        for (index, frame) in target.frames.enumerated() {
            #expect(guest.memory.page(frame).load(fromByteOffset: 4095, as: UInt8.self) == UInt8(index + 1))
        }
        #expect(rings.statistics.writeSectors == 512 && rings.statistics.readSectors == 512)
        try guest.release(data)
        try guest.release(target)
        try guest.release(indirectPage)
        #expect(rings.disconnect())
    }

    @Test func barrierAndDiscard() throws {
        let guest = try DataPathGuest()
        defer { guest.remove() }
        let rings = try guest.connect()
        let page = try guest.grantPages(1, readOnly: true) { _ in 0x5A }
        // Some writes, then a barrier write: all complete, the barrier's data lands.
        let writes = (0..<8).map { guest.readWrite(.write, sector: UInt64($0) * 8, refs: page.refs) }
        let barrier = guest.readWrite(.writeBarrier, sector: 64, refs: page.refs)
        try guest.submit(writes + [barrier])
        let answers = try guest.responses(9)
        #expect(answers.count == 9 && answers.allSatisfy { $0.status == .okay })
        #expect(answers.last == BlkifResponse(answering: barrier, status: .okay))
        #expect(try guest.image()[64 * 512] == 0x5A)

        // A regular file on a file system that punches holes (ext4, xfs, tmpfs...).
        #expect(rings.features.discard && rings.features.discardGranularity >= 512)
        let discard = BlkifRequest.discard(.init(id: guest.makeID(), sectorNumber: 0, nrSectors: 72))
        #expect(try guest.roundTrip(discard)?.status == .okay)
        #expect(try guest.image().prefix(72 * 512).allSatisfy { $0 == 0 })
        #expect(rings.statistics.discardRequests == 1)
        #expect(rings.statistics.flushRequests == 1 && rings.statistics.writeRequests == 8)
        try guest.release(page)
        #expect(rings.disconnect())
    }

    /// The worker blocks mapping a grant while the test holds the simulated hypervisor's grant
    /// lock: a request is in flight for as long as the test wants.
    @Test func disconnectWaitsForInFlightRequestsThenTheGuestReconnects() throws {
        let guest = try DataPathGuest()
        defer { guest.remove() }
        let rings = try guest.connect()
        let page = try guest.grantPages(1, readOnly: false)

        let lock = try SimGrantActiveTable(directory: guest.dir.path, domain: DataPathGuest.domid)
        try lock.lock()
        try guest.submit([guest.readWrite(.read, sector: 0, refs: page.refs)])
        #expect(eventually { rings.statistics.inflight == 1 })
        #expect(!rings.disconnect())
        #expect(!rings.disconnect())
        lock.unlock()
        #expect(try guest.responses(1).first?.status == .okay)
        #expect(eventually { rings.disconnect() })
        #expect(rings.disconnect())  // idempotent

        // Reconnect over a fresh ring on the same page and event channel.
        guest.resetRing()
        let again = try guest.connect()
        #expect(try guest.roundTrip(guest.readWrite(.read, sector: 8, refs: page.refs))?.status == .okay)
        #expect(again.statistics.readRequests == 1)  // counters start again at connect
        #expect(again.disconnect())
        try guest.release(page)
    }

    @Test func frontendDomainDestroyedWithRequestInFlight() throws {
        let guest = try DataPathGuest()
        defer { guest.remove() }
        let rings = try guest.connect()
        let page = try guest.grantPages(1, readOnly: true) { _ in 0x33 }
        let lock = try SimGrantActiveTable(directory: guest.dir.path, domain: DataPathGuest.domid)
        try lock.lock()
        try guest.submit([guest.readWrite(.write, sector: 0, refs: page.refs)])
        #expect(eventually { rings.statistics.inflight == 1 })
        try SimDomain.destroyDomain(directory: guest.dir.path, domid: DataPathGuest.domid)
        guest.broker.broker.removeDomain(DataPathGuest.domid)
        #expect(!rings.disconnect())
        lock.unlock()
        #expect(eventually { rings.disconnect() })
    }

    @Test func connectFailureReleasesEveryQueueAlreadySetUp() throws {
        let guest = try DataPathGuest()
        defer { guest.remove() }
        var request = try guest.request()
        let secondPort = try guest.events.allocUnbound(remoteDomain: 0)
        request.rings.queues.append(RingQueue(ringRefs: [999_999], eventChannel: secondPort))
        #expect {
            _ = try guest.dataPlane.connect(request)
        } throws: { error in
            "\(error)".hasPrefix("mapping ring of queue 1") && !"\(error)".contains("\n")
        }
        // Queue 0's ring page is no longer mapped and its port is free to bind again.
        #expect(guest.grants.entry(guest.ringRef).flags & (GrantFlags.reading | GrantFlags.writing) == 0)
        let rings = try guest.connect()
        let page = try guest.grantPages(1, readOnly: false)
        #expect(try guest.roundTrip(guest.readWrite(.read, sector: 0, refs: page.refs))?.status == .okay)
        #expect(rings.disconnect())
        #expect(guest.grants.entry(guest.ringRef).flags & (GrantFlags.reading | GrantFlags.writing) == 0)
    }

    @Test func ringIndexAbuseStopsOnlyThatRing() throws {
        let guest = try DataPathGuest()
        defer { guest.remove() }
        let rings = try guest.connect()
        // req_prod far beyond rsp_prod + ring size.
        guest.memory.page(guest.ringFrame).storeBytes(of: UInt32(1000), as: UInt32.self)
        try guest.events.notify(guest.port)
        #expect(try guest.responses(1, within: 0.5).isEmpty)
        #expect(rings.statistics.inflight == 0)
        #expect(rings.disconnect())
        // The device can be connected again with a sane ring.
        guest.resetRing()
        let again = try guest.connect()
        let page = try guest.grantPages(1, readOnly: false)
        #expect(try guest.roundTrip(guest.readWrite(.read, sector: 0, refs: page.refs))?.status == .okay)
        #expect(again.disconnect())
    }

    /// 4096 random 4 KiB reads kept at queue depth 32 (a count, not a time: speed is the
    /// benchmark's business, scripts/bench.sh).
    @Test func queueDepth32RandomReads() throws {
        let guest = try DataPathGuest(imageSectors: 1 << 16)
        defer { guest.remove() }
        let rings = try guest.connect()
        let pages = try guest.grantPages(32, readOnly: false)
        let total = 4096
        var issued = 0, outstanding = 0, completed = 0, failures = 0
        while completed < total {
            var batch: [BlkifRequest] = []
            while outstanding + batch.count < 32, issued + batch.count < total {
                let slot = outstanding + batch.count
                batch.append(guest.readWrite(.read, sector: UInt64.random(in: 0..<(1 << 13)) * 8, refs: [pages.refs[slot]]))
            }
            try guest.submit(batch)
            issued += batch.count
            outstanding += batch.count
            let answers = try guest.responses(1)
            guard !answers.isEmpty else { break }
            // Take everything ready, not just one.
            var all = answers
            _ = try guest.front.unconsumedResponses()
            while let more = guest.front.takeResponse() { all.append(more) }
            failures += all.filter { $0.status != .okay }.count
            completed += all.count
            outstanding -= all.count
        }
        #expect(failures == 0 && completed == total && outstanding == 0)
        #expect(rings.statistics.readRequests == UInt64(total))
        #expect(rings.disconnect())
    }
}
