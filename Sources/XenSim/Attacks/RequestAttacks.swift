import Blkif
import Foundation
import Hypervisor
import SimHypervisor
import Xenbus

// Malformed requests on an otherwise healthy ring: each must get an error answer, nothing
// may be written into the guest's pages or the disk, and the ring keeps being served.

extension AttackSession {
    /// Grants `segments`' indirect pages (read-only, as blkfront does without persistent
    /// grants) and builds the request; the caller releases the returned pages.
    func indirect(_ operation: BlkifOperation, sector: UInt64, segments: [BlkifSegment],
                  nrSegments: UInt16? = nil, readOnly: Bool = true) throws -> (BlkifRequest, [GrantedPage]) {
        let perPage = Blkif.segmentsPerIndirectPage
        let pageCount = max(1, min(Blkif.indirectPages(forSegments: segments.count), Blkif.maxIndirectPagesPerRequest))
        let indirectPages = try pages.grant(pageCount, to: backendId, readOnly: readOnly) { page, memory in
            let start = min(segments.count, page * perPage)
            BlkifIndirectPage.write(segments[start..<min(segments.count, start + perPage)], to: memory)
        }
        var grefs = FixedCapacityList<8, UInt32>()
        indirectPages.forEach { grefs.append($0.ref) }
        let request = BlkifRequest.indirect(.init(
            indirectOperation: operation, nrSegments: nrSegments ?? UInt16(segments.count),
            handle: UInt16(truncatingIfNeeded: options.devid), id: makeId(), sectorNumber: sector, indirectGrefs: grefs))
        return (request, indirectPages)
    }

    /// Segments covering whole pages.
    func wholePages(_ granted: [GrantedPage]) -> [BlkifSegment] {
        granted.map { BlkifSegment(gref: $0.ref, firstSect: 0, lastSect: 7) }
    }

    /// The same READ/WRITE with another nr_segments than its segment list says.
    func withSegmentCount(_ request: BlkifRequest, _ count: UInt8) -> BlkifRequest {
        guard case .readWrite(var rw) = request else { return request }
        rw.nrSegments = count
        return .readWrite(rw)
    }

    /// A ref this guest never granted (the top of the table; the allocator hands out low refs).
    func neverGrantedRef() throws -> UInt32 {
        let ref = UInt32(pages.grants.entryCount - 1)
        guard pages.grants.entry(ref).flags & GrantFlags.typeMask == 0 else {
            throw FrontendFailure("grant ref \(ref) is in use; the guest's grant table is nearly full")
        }
        return ref
    }
}

/// A domain that is neither the backend nor the guest: grants for it are no grants for the backend.
let strangerDomain: UInt32 = DomainID.largest.rawValue

extension Attack {
    static let readIntoReadOnlyGrant = Attack.onConnectedDevice(
        name: "read-into-readonly-grant",
        summary: "READ into pages granted read-only (direct and indirect) → BLKIF_RSP_ERROR, pages untouched"
    ) { s in
        let readOnly = try s.grant(1, readOnly: true)
        let writable = try s.grant(1)
        try s.expectRefused(s.readWrite(.read, sector: 0, pages: readOnly), "READ into a read-only grant", canaries: readOnly)
        try s.expectRefused(s.readWrite(.read, sector: 0, pages: writable + readOnly),
                            "READ into a writable and a read-only grant", canaries: writable + readOnly)
        if try s.backendIndirectSegments() > Blkif.maxSegmentsPerRequest {
            let data = try s.grant(Blkif.maxSegmentsPerRequest)
            let (request, indirectPages) = try s.indirect(.read, sector: 0, segments: s.wholePages(data + readOnly))
            try s.expectRefused(request, "indirect READ with a read-only grant among 12", canaries: data + readOnly)
            s.release(data + indirectPages)
        }
        s.release(readOnly + writable)
    }

    static let badGrantRef = Attack.onConnectedDevice(
        name: "bad-grant-ref",
        summary: "segments and indirect pages naming refs never granted, out of the table, or granted to another domain → error"
    ) { s in
        let good = try s.grant(1)
        let stranger = try s.pages.grant(1, to: strangerDomain, readOnly: false)
        let cases: [(String, UInt32)] = [("a ref never granted", try s.neverGrantedRef()),
                                         ("a ref beyond the grant table", 0xFFFF_FFF0),
                                         ("a reserved ref (0)", 0),
                                         ("a ref granted to domain \(strangerDomain)", stranger[0].ref)]
        for (what, ref) in cases {
            for operation in [BlkifOperation.read, .write] {
                var segments = FixedCapacityList<11, BlkifSegment>()
                segments.append(BlkifSegment(gref: good[0].ref, firstSect: 0, lastSect: 7))
                segments.append(BlkifSegment(gref: ref, firstSect: 0, lastSect: 7))
                let request = BlkifRequest.readWrite(.init(operation: operation, id: s.makeId(), sectorNumber: 0, segments: segments))
                try s.expectRefused(request, "\(operation) with \(what)", canaries: good)
            }
            if try s.backendIndirectSegments() > Blkif.maxSegmentsPerRequest {
                var grefs = FixedCapacityList<8, UInt32>()
                grefs.append(ref)
                let request = BlkifRequest.indirect(.init(indirectOperation: .read, nrSegments: 12, id: s.makeId(),
                                                          sectorNumber: 0, indirectGrefs: grefs))
                try s.expectRefused(request, "indirect READ whose indirect page is \(what)")
            }
        }
        s.release(good + stranger)
    }

    static let zeroSegments = Attack.onConnectedDevice(
        name: "zero-segments",
        summary: "READ and WRITE with nr_segments 0 → error (a FLUSH without data stays fine)"
    ) { s in
        for operation in [BlkifOperation.read, .write] {
            try s.expectRefused(s.readWrite(operation, sector: 0, pages: []), "\(operation) with 0 segments")
        }
        try s.expect(s.readWrite(.flushDiskCache, sector: 0, pages: []), [.okay], "FLUSH_DISKCACHE without data (valid)")
    }

    static let tooManySegments = Attack.onConnectedDevice(
        name: "too-many-segments",
        summary: "direct READ/WRITE claiming nr_segments 12 or 255 (BLKIF_MAX_SEGMENTS_PER_REQUEST is 11) → error"
    ) { s in
        let data = try s.grant(Blkif.maxSegmentsPerRequest)
        for operation in [BlkifOperation.read, .write] {
            for count: UInt8 in [12, 255] {
                let request = s.withSegmentCount(s.readWrite(operation, sector: 0, pages: data), count)
                try s.expectRefused(request, "direct \(operation) with nr_segments \(count)", canaries: data)
            }
        }
        s.release(data)
    }

    static let badSegmentSectors = Attack.onConnectedDevice(
        name: "bad-segment-sectors",
        summary: "segments with last_sect ≥ 8 or last_sect < first_sect (alone or after a good one) → error"
    ) { s in
        let data = try s.grant(2)
        let shapes: [(UInt8, UInt8)] = [(0, 8), (0, 255), (5, 2), (8, 8), (7, 6)]
        for operation in [BlkifOperation.read, .write] {
            for (first, last) in shapes {
                try s.expectRefused(s.readWrite(operation, sector: 0, pages: [data[0]], firstSect: first, lastSect: last),
                                    "\(operation) with a segment of sectors \(first)...\(last)", canaries: data)
                var segments = FixedCapacityList<11, BlkifSegment>()
                segments.append(BlkifSegment(gref: data[0].ref, firstSect: 0, lastSect: 7))
                segments.append(BlkifSegment(gref: data[1].ref, firstSect: first, lastSect: last))
                let request = BlkifRequest.readWrite(.init(operation: operation, id: s.makeId(), sectorNumber: 0, segments: segments))
                try s.expectRefused(request, "\(operation) with a good segment then sectors \(first)...\(last)", canaries: data)
            }
        }
        // The control: a segment inside the page is served.
        try s.expect(s.readWrite(.read, sector: 0, pages: [data[0]], firstSect: 2, lastSect: 5), [.okay],
                     "READ of sectors 2...5 of a page (valid)")
        s.release(data)
    }

    static let sectorOutOfRange = Attack(
        name: "sector-out-of-range",
        summary: "READ/WRITE/DISCARD past the end of the disk, across it, and wrapping around UInt64.max → error"
    ) { s in
        let disk = try s.connect()
        guard disk.sectors >= 8 else { throw FrontendFailure("the disk has \(disk.sectors) sectors; the attack needs 8") }
        let data = try s.grant(1)
        let end = disk.sectors
        let starts: [(String, UInt64)] = [("at the end", end), ("across the end", end - 7), ("far past the end", end + 1 << 20),
                                         ("whose byte offset wraps (2^55)", 1 << 55), ("wrapping around UInt64.max", UInt64.max - 3),
                                         ("at UInt64.max", UInt64.max)]
        for operation in [BlkifOperation.read, .write] {
            for (what, sector) in starts {
                try s.expectRefused(s.readWrite(operation, sector: sector, pages: data), "\(operation) \(what) (sector \(sector))",
                                    canaries: operation == .read ? data : [])
            }
        }
        if disk.features.discard {
            let discards: [(String, UInt64, UInt64)] = [("across the end", end - 1, 2), ("past the end", end, 8),
                                                       ("wrapping around", UInt64.max, 2), ("of UInt64.max sectors", 0, UInt64.max)]
            for (what, sector, count) in discards {
                let request = BlkifRequest.discard(.init(id: s.makeId(), sectorNumber: sector, nrSectors: count))
                try s.expectRefused(request, "DISCARD \(what)")
            }
        }
        try s.expect(s.readWrite(.read, sector: end - 8, pages: data), [.okay], "READ of the last 8 sectors (valid)")
        s.release(data)
        try s.verifyStillServed()
    }

    static let unknownOperation = Attack.onConnectedDevice(
        name: "unknown-operation",
        summary: "operations 4 (reserved), 7, 8, 100, 255 → BLKIF_RSP_EOPNOTSUPP echoing the operation"
    ) { s in
        for raw: UInt8 in [4, 7, 8, 100, 255] {
            try s.expect(.other(operation: .unknown(raw), id: s.makeId()), [.notSupported], "operation \(raw)")
        }
    }

    static let writeOnReadOnlyDevice = Attack(
        name: "write-barrier-or-discard-on-read-only",
        summary: "on a device attached --mode r: WRITE, WRITE_BARRIER and FLUSH with data, DISCARD, indirect WRITE → refused, disk unchanged (CVE-2013-2140)"
    ) { s in
        let disk = try s.connect()
        guard disk.readOnly else {
            throw FrontendFailure("device \(s.options.devid) is writable; attach it with `xensim attach --mode r` for this attack")
        }
        let before = try s.readBack(sector: 0, count: 2, "READ of sectors 0...15 before")
        let data = try s.grant(2, filledWith: 0xC3)
        for operation in [BlkifOperation.write, .writeBarrier, .flushDiskCache] {
            try s.expectRefused(s.readWrite(operation, sector: 0, pages: data), "\(operation) with data on a read-only device")
        }
        try s.expectRefused(.discard(.init(id: s.makeId(), sectorNumber: 0, nrSectors: 16)),
                            "DISCARD on a read-only device", statuses: [.error, .notSupported])
        if try s.backendIndirectSegments() > Blkif.maxSegmentsPerRequest {
            let more = try s.grant(Blkif.maxSegmentsPerRequest - 1, filledWith: 0xC3)
            let (request, indirectPages) = try s.indirect(.write, sector: 0, segments: s.wholePages(data + more + data))
            try s.expectRefused(request, "indirect WRITE on a read-only device")
            s.release(more + indirectPages)
        }
        s.release(data)
        let after = try s.readBack(sector: 0, count: 2, "READ of sectors 0...15 after")
        guard before == after else { throw AttackFailure("the read-only disk changed under refused writes") }
        s.log("the read-only disk is unchanged")
        try s.verifyStillServed()
    }

    static let indirectAbuse = Attack.onConnectedDevice(
        name: "indirect-abuse",
        summary: "indirect requests with inner op other than READ/WRITE, nr_segments 0 or above feature-max-indirect-segments, bad segments in the indirect page → error"
    ) { s in
        let offered = try s.backendIndirectSegments()
        let data = try s.grant(16)
        var granted: [GrantedPage] = []
        defer { s.release(data + granted) }
        func refuse(_ operation: BlkifOperation, _ segments: [BlkifSegment], nr: UInt16? = nil, _ what: String) throws {
            let (request, indirectPages) = try s.indirect(operation, sector: 0, segments: segments, nrSegments: nr)
            granted += indirectPages
            try s.expectRefused(request, what, canaries: data)
        }
        let good = s.wholePages(Array(data.prefix(12)))
        for inner: UInt8 in [2, 3, 5, 6, 200] {
            try refuse(BlkifOperation(rawValue: inner), good, "indirect request with inner operation \(inner)")
        }
        try refuse(.read, good, nr: 0, "indirect READ with nr_segments 0")
        try refuse(.read, good, nr: UInt16(offered + 1), "indirect READ with nr_segments \(offered + 1) (offered \(offered))")
        try refuse(.read, good, nr: UInt16.max, "indirect READ with nr_segments 65535")
        var broken = good
        broken[11].lastSect = 9
        try refuse(.read, broken, "indirect READ with last_sect 9 in its 12th segment")
        broken = good
        broken[3] = BlkifSegment(gref: good[3].gref, firstSect: 6, lastSect: 1)
        try refuse(.write, broken, "indirect WRITE with a reversed segment")
        if offered >= 16 {
            let (request, indirectPages) = try s.indirect(.read, sector: 0, segments: s.wholePages(data))
            granted += indirectPages
            try s.expect(request, [.okay], "indirect READ of 16 segments (valid)")
        } else {
            s.log("the backend offers \(offered) indirect segments: every indirect request above was refused as it must be")
        }
    }
}
