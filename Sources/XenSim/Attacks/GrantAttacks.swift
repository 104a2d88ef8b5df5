import Blkif
import Foundation
import Hypervisor
import SimHypervisor

// Grants named where they must not be, and persistent grants abused: the backend keeps
// pages mapped across requests there, so a ref it already holds must not be taken twice
// (Linux blkback once BUG()ed on a repeated ref) and what it keeps must stay bounded.

extension Attack {
    static let duplicateGrantRefs = Attack.onConnectedDevice(
        name: "duplicate-grant-refs",
        summary: "a READ naming the same grant twice (direct and indirect), with and without persistent grants → error, page untouched"
    ) { s in
        try s.withAndWithoutPersistentGrants { persistent, mode in
            let page = try s.grant(1)
            try s.expectRefused(s.readWrite(.read, sector: 0, pages: page + page), "READ naming one grant twice \(mode)", canaries: page)
            if try s.backendIndirectSegments() > Blkif.maxSegmentsPerRequest {
                let data = try s.grant(Blkif.maxSegmentsPerRequest)
                let (request, indirectPages) = try s.indirect(.read, sector: 0, segments: s.wholePages(data + page + page),
                                                              readOnly: !persistent)
                try s.expectRefused(request, "indirect READ naming a grant twice among 13 \(mode)", canaries: data + page)
                s.release(data + indirectPages)
            }
            s.release(page)
        }
    }

    static let dataRefIsRingRef = Attack.onConnectedDevice(
        name: "data-ref-is-ring-ref",
        summary: "READ into the ring's own page, and its ref as an indirect page, with and without persistent grants → error, ring intact"
    ) { s in
        try s.withAndWithoutPersistentGrants { _, mode in
            let ring = try s.queue.ringPages[0]
            try s.expectRefused(s.readWrite(.read, sector: 0, pages: [ring]), "READ into the ring page \(mode)")
            try s.expectRefused(s.readWrite(.write, sector: 0, pages: [ring]), "WRITE from the ring page \(mode)")
            if try s.backendIndirectSegments() > Blkif.maxSegmentsPerRequest {
                let data = try s.grant(Blkif.maxSegmentsPerRequest + 1)
                var grefs = FixedCapacityList<8, UInt32>()
                grefs.append(ring.ref)
                let request = BlkifRequest.indirect(.init(
                    indirectOperation: .read, nrSegments: UInt16(data.count), handle: UInt16(truncatingIfNeeded: s.options.devid),
                    id: s.makeId(), sectorNumber: 0, indirectGrefs: grefs))
                try s.expectRefused(request, "indirect READ whose indirect page is the ring page \(mode)", canaries: data)
                s.release(data)
            }
        }
    }

    static let persistentGrantOverflow = Attack.onConnectedDevice(
        name: "persistent-grant-overflow",
        summary: "32 indirect WRITEs of 64 fresh grants each in flight (2048 refs, past the 1056 persistent limit) → all served, read back intact, at most 1056 kept mapped"
    ) { s in
        try s.reconnect(persistentGrants: true)
        let segmentsPerRequest = 64
        guard try s.backendIndirectSegments() >= segmentsPerRequest else {
            throw FrontendFailure("the backend offers fewer than \(segmentsPerRequest) indirect segments; nothing to overflow")
        }
        let slots = Int(try s.queue.ring.shared.size)
        var inFlight: [(id: UInt64, data: [GrantedPage], indirect: [GrantedPage], sector: UInt64, fill: UInt8)] = []
        let queue = try s.queue
        for index in 0..<slots {
            let fill = UInt8(0x20 + index)
            let data = try s.grant(segmentsPerRequest, filledWith: fill)
            let sector = UInt64(index * segmentsPerRequest * Int(Blkif.sectorsPerPage))
            let (request, indirectPages) = try s.indirect(.write, sector: sector, segments: s.wholePages(data), readOnly: false)
            guard queue.ring.putRequest(request) else { throw FrontendFailure("the ring is full") }
            inFlight.append((request.id, data, indirectPages, sector, fill))
        }
        _ = queue.ring.pushRequestsAndCheckNotify()
        try s.device.eventChannels.notify(queue.port)
        for request in inFlight {
            guard let response = try s.awaitResponse(request.id) else {
                throw AttackFailure("a WRITE past the persistent limit was never answered")
            }
            guard response.status == .okay else {
                throw AttackFailure("a WRITE past the persistent limit was answered \(response.status)")
            }
        }
        let refs = inFlight.flatMap { $0.data + $0.indirect }.map(\.ref)
        let kept = refs.filter { s.pages.grants.isMappedByBackend($0) }.count
        guard kept <= 1056 else {
            throw AttackFailure("the backend keeps \(kept) of \(refs.count) grants mapped, past the persistent limit of 1056")
        }
        s.log("\(refs.count) grants in flight: all served, \(kept) kept mapped")
        for request in inFlight.prefix(4) + inFlight.suffix(4) {
            let bytes = try s.readBack(sector: request.sector, count: Blkif.maxSegmentsPerRequest, "reading back a WRITE past the limit")
            guard bytes.allSatisfy({ $0 == request.fill }) else {
                throw AttackFailure("the WRITE at sector \(request.sector) did not reach the disk intact")
            }
        }
        s.release(inFlight.flatMap { $0.data + $0.indirect })
    }

    static let persistentFlip = Attack.onConnectedDevice(
        name: "persistent-flip",
        summary: "feature-persistent on, off, on across reconnects with verified I/O each time → the backend follows, no grant stays mapped"
    ) { s in
        for persistent in [true, false, true] {
            s.device.options.persistentGrants = persistent
            let report = try s.verifyStillServed("persistent grants \(persistent ? "on" : "off")")
            guard report.negotiated?.persistentGrants == persistent else {
                throw AttackFailure("feature-persistent=\(persistent ? 1 : 0) was not followed (negotiated \(String(describing: report.negotiated?.persistentGrants)))")
            }
        }
    }
}
