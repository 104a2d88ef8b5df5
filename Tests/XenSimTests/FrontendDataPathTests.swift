import Engine
import Glibc
import SimHypervisor
import Testing
@testable import XenSim

/// The guest's half of the data path against the backend's real pieces: its grant mapper
/// maps the pages the frontend granted, its back ring answers over the shared ring, and the
/// event channels go through a broker, all in one process but through the simulator's files.
@Suite(.serialized) struct FrontendDataPathTests {
    let dir = SimDirectory()
    let domid: UInt32 = 1

    init() throws {
        try SimDomain.createDomain(directory: dir.path, domid: domid, memoryMB: 4)
    }

    func pages() throws -> GrantedPages {
        GrantedPages(memory: try GuestMemory(directory: dir.path, domid: domid),
                     grants: try GuestGrantTable(directory: dir.path, domid: domid))
    }

    @Test func pageTheBackendStillMapsIsNotReusedUntilUnmapped() throws {
        defer { dir.remove() }
        let pages = try pages()
        let granted = try pages.grant(2, to: 0, readOnly: true) { index, page in
            page.storeBytes(of: UInt32(0xC0DE + index), as: UInt32.self)
        }
        let mapper = SimGrantMapper(directory: dir.path)
        let mapping = try mapper.map(domain: domid, refs: [granted[0].ref], writable: false)
        #expect(mapping.page(0).load(as: UInt32.self) == 0xC0DE)

        pages.release(granted)
        #expect(pages.busy == [granted[0]])
        // The freed page (granted[1]) comes back; the mapped one must not.
        let next = try pages.memory.allocatePages(1)
        #expect(next == [granted[1].frame])
        #expect(pages.retryBusy() == 1)

        try mapping.unmap()
        #expect(pages.retryBusy() == 0)
        #expect(pages.busy.isEmpty)
        #expect(try pages.memory.allocatePages(1) == [granted[0].frame])
    }

    @Test func writableGrantOnlyForReads() throws {
        defer { dir.remove() }
        let pages = try pages()
        let forWrite = try pages.grant(1, to: 0, readOnly: true)
        let mapper = SimGrantMapper(directory: dir.path)
        // A write request's data is granted read-only: the backend cannot map it writable.
        #expect(throws: HypervisorError.self) { try mapper.map(domain: domid, refs: [forWrite[0].ref], writable: true) }
        let forRead = try pages.grant(1, to: 0, readOnly: false)
        let mapping = try mapper.map(domain: domid, refs: [forRead[0].ref], writable: true)
        mapping.page(0).storeBytes(of: UInt64(42), as: UInt64.self)
        try mapping.unmap()
        #expect(pages.pointer(forRead[0]).load(as: UInt64.self) == 42)
        pages.release(forWrite + forRead)
        #expect(pages.busy.isEmpty)
    }

    @Test(arguments: [(0, BlkifProtocol.native), (2, .x86_32), (4, .x86_64)])
    func ringRoundTripThroughTheBackendsMapping(order: Int, abi: BlkifProtocol) throws {
        defer { dir.remove() }
        let broker = try BrokerThread(directory: dir.path)
        defer { broker.stop() }
        let pages = try pages()
        let guestChannels = try GuestEventChannels(directory: dir.path, domain: domid)
        let queue = try BlockfrontQueue(index: 0, pageOrder: order, protocol: abi, backend: 0, pages: pages,
                                        eventChannels: guestChannels)
        #expect(queue.ringPages.count == 1 << order)
        // The keys talk_to_blkback writes (two queues, so under queue-N/) read back the same.
        let description = RingDescription(protocol: abi, ringPageOrder: order, queues: [queue.ringQueue, queue.ringQueue],
                                          persistentGrants: false)
        let keys = Dictionary(uniqueKeysWithValues: description.keys)
        #expect(keys["queue-0/event-channel"] == "\(queue.port)")
        #expect(keys.count == 2 * (order > 0 ? (1 << order) + 1 : 2) + (order > 0 ? 1 : 0) + 3)
        let limits = RingLimits(maxQueues: 2, maxRingPageOrder: 4, persistentGrants: true)
        #expect(try RingDescription.read(limits: limits, keys: keys).keys.map(\.0) == description.keys.map(\.0))
        #expect(try RingDescription.read(limits: limits, keys: keys).queues == description.queues)

        // The backend's side, as the data plane sets it up from those keys.
        let mapper = SimGrantMapper(directory: dir.path)
        let ringMapping = try mapper.map(domain: domid, refs: queue.ringPages.map(\.ref), writable: true)
        var back = BackRing(attaching: SharedRing(memory: ringMapping.base, pageCount: 1 << order, protocol: abi))
        let backendChannels = try SimEventChannels(directory: dir.path, domain: 0)
        let backendPort = try backendChannels.bindInterdomain(remoteDomain: domid, remotePort: queue.port)
        #expect(back.shared.size == queue.ring.shared.size)

        // One write of 8 sectors, stamped by the guest, read through the backend's mapping.
        let data = try pages.grant(1, to: 0, readOnly: true) { _, page in
            for s in 0..<8 { SectorStamp.write(sector: 64 + UInt64(s), generation: 7, to: page + s * 512) }
        }
        let request = BlkifRequest.readWrite(.init(operation: .write, handle: 5, id: 99, sectorNumber: 64,
                                                   segments: [BlkifSegment(gref: data[0].ref, firstSect: 0, lastSect: 7)]))
        let put = queue.ring.putRequest(request)
        let notify = queue.ring.pushRequestsAndCheckNotify()
        #expect(put && notify)
        try guestChannels.notify(queue.port)

        #expect(readable(backendChannels.fileDescriptor, within: 30_000))
        let waiting = try back.unconsumedRequests()
        #expect(waiting == 1)
        let next = back.takeRequest()
        let taken = try #require(next)
        #expect(taken == request)
        guard case let .readWrite(rw) = taken else { Issue.record("not a read/write"); return }
        let dataMapping = try mapper.map(domain: domid, refs: [rw.segments[0].gref], writable: false)
        for s in 0..<8 {
            #expect(SectorStamp.check(sector: 64 + UInt64(s), at: dataMapping.page(0) + s * 512) == .stamp(generation: 7))
        }
        try dataMapping.unmap()
        back.putResponse(BlkifResponse(answering: taken, status: .okay))
        if back.pushResponsesAndCheckNotify() { try backendChannels.notify(backendPort) }

        // The guest wakes on its port and takes the answer with the final check.
        #expect(readable(guestChannels.fileDescriptor, within: 30_000))
        #expect(try guestChannels.pending().contains(queue.port))
        let answers = try queue.ring.unconsumedResponses()
        let answer = queue.ring.takeResponse()
        let more = try queue.ring.finalCheckForResponses()
        #expect(answers == 1 && !more)
        #expect(answer == BlkifResponse(id: 99, operation: .write, status: .okay))
        try guestChannels.unmask(queue.port)
        pages.release(data)
        #expect(pages.busy.isEmpty)

        // Tearing the queue down while the backend still maps the ring keeps those pages aside.
        queue.release(pages: pages, eventChannels: guestChannels)
        #expect(pages.busy.count == 1 << order)
        try ringMapping.unmap()
        #expect(pages.retryBusy() == 0)
    }
}
