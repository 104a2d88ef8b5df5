@testable import Blkif
import Engine
import Testing

/// Every rejection of the backend-side validation, and the requests that must pass.
@Suite struct RingValidationTests {
    static let disk = BlkifRequestLimits(sectors: 1000, readOnly: false, maxIndirectSegments: 256)
    static let readOnlyDisk = BlkifRequestLimits(sectors: 1000, readOnly: true, maxIndirectSegments: 256)
    static let page = BlkifSegment(gref: 1, firstSect: 0, lastSect: 7)

    static func rw(_ operation: BlkifOperation, sector: UInt64 = 0, _ list: [BlkifSegment] = [page],
                   nrSegments: UInt8? = nil) -> BlkifRequest {
        var request = BlkifRequest.ReadWrite(operation: operation, id: 42, sectorNumber: sector, segments: segments(list))
        if let nrSegments { request.nrSegments = nrSegments }
        return .readWrite(request)
    }

    static func indirect(_ operation: BlkifOperation, segments count: UInt16, grefs: FixedCapacityList<8, UInt32>? = nil)
        -> BlkifRequest.Indirect {
        var pages = FixedCapacityList<8, UInt32>()
        if let grefs {
            pages = grefs
        } else {
            for gref in 0..<Blkif.indirectPages(forSegments: Int(count)) { pages.append(UInt32(gref)) }
        }
        return .init(indirectOperation: operation, nrSegments: count, id: 42, sectorNumber: 0, indirectGrefs: pages)
    }

    struct Case: Sendable, CustomTestStringConvertible {
        let name: String
        let request: BlkifRequest
        let limits: BlkifRequestLimits
        let expected: BlkifRequestError?
        var testDescription: String { name }
    }

    static let cases: [Case] = [
        Case(name: "read one page", request: rw(.read), limits: disk, expected: nil),
        Case(name: "write to last sectors", request: rw(.write, sector: 992), limits: disk, expected: nil),
        Case(name: "write 11 segments", request: rw(.write, Array(repeating: page, count: 11)), limits: disk, expected: nil),
        Case(name: "read on read-only", request: rw(.read), limits: readOnlyDisk, expected: nil),
        Case(name: "flush without data", request: rw(.flushDiskCache, []), limits: disk, expected: nil),
        Case(name: "flush without data on read-only", request: rw(.flushDiskCache, []), limits: readOnlyDisk, expected: nil),
        Case(name: "barrier without data on read-only", request: rw(.writeBarrier, []), limits: readOnlyDisk, expected: nil),
        Case(name: "discard", request: .discard(.init(id: 1, sectorNumber: 10, nrSectors: 990)), limits: disk, expected: nil),
        Case(name: "indirect header", request: .indirect(indirect(.write, segments: 256)), limits: disk, expected: nil),

        Case(name: "unknown op", request: .other(operation: .unknown(4), id: 1), limits: disk,
             expected: .unsupportedOperation(.unknown(4))),
        Case(name: "read without segments", request: rw(.read, []), limits: disk, expected: .noSegments),
        Case(name: "write without segments", request: rw(.write, []), limits: disk, expected: .noSegments),
        Case(name: "12 direct segments", request: rw(.read, nrSegments: 12), limits: disk,
             expected: .tooManySegments(count: 12, maximum: 11)),
        Case(name: "flush with 255 segments", request: rw(.flushDiskCache, nrSegments: 255), limits: disk,
             expected: .tooManySegments(count: 255, maximum: 11)),
        Case(name: "last_sect 8", request: rw(.read, [page, .init(gref: 2, firstSect: 0, lastSect: 8)]), limits: disk,
             expected: .segmentBeyondPage(index: 1, lastSect: 8)),
        Case(name: "last_sect 255", request: rw(.write, [.init(gref: 2, firstSect: 255, lastSect: 255)]), limits: disk,
             expected: .segmentBeyondPage(index: 0, lastSect: 255)),
        Case(name: "last_sect < first_sect", request: rw(.read, [.init(gref: 2, firstSect: 5, lastSect: 4)]), limits: disk,
             expected: .segmentReversed(index: 0, firstSect: 5, lastSect: 4)),
        Case(name: "read past the end", request: rw(.read, sector: 993), limits: disk,
             expected: .beyondDeviceEnd(sectorNumber: 993, sectorCount: 8, deviceSectors: 1000)),
        Case(name: "read wrapping", request: rw(.read, sector: .max - 3), limits: disk,
             expected: .beyondDeviceEnd(sectorNumber: .max - 3, sectorCount: 8, deviceSectors: 1000)),
        Case(name: "write on read-only", request: rw(.write), limits: readOnlyDisk, expected: .readOnlyDevice(.write)),
        Case(name: "flush with data on read-only", request: rw(.flushDiskCache), limits: readOnlyDisk,
             expected: .readOnlyDevice(.flushDiskCache)),
        Case(name: "barrier with data on read-only", request: rw(.writeBarrier), limits: readOnlyDisk,
             expected: .readOnlyDevice(.writeBarrier)),
        Case(name: "discard on read-only", request: .discard(.init(id: 1, sectorNumber: 0, nrSectors: 1)), limits: readOnlyDisk,
             expected: .readOnlyDevice(.discard)),
        Case(name: "discard past the end", request: .discard(.init(id: 1, sectorNumber: 10, nrSectors: 991)), limits: disk,
             expected: .beyondDeviceEnd(sectorNumber: 10, sectorCount: 991, deviceSectors: 1000)),
        Case(name: "discard wrapping", request: .discard(.init(id: 1, sectorNumber: 2, nrSectors: .max)), limits: disk,
             expected: .beyondDeviceEnd(sectorNumber: 2, sectorCount: .max, deviceSectors: 1000)),
        Case(name: "indirect flush", request: .indirect(indirect(.flushDiskCache, segments: 1)), limits: disk,
             expected: .invalidIndirectOperation(.flushDiskCache)),
        Case(name: "indirect nested", request: .indirect(indirect(.indirect, segments: 1)), limits: disk,
             expected: .invalidIndirectOperation(.indirect)),
        Case(name: "indirect without segments", request: .indirect(indirect(.read, segments: 0)), limits: disk,
             expected: .noSegments),
        Case(name: "indirect over the advertised max", request: .indirect(indirect(.read, segments: 257)), limits: disk,
             expected: .tooManySegments(count: 257, maximum: 256)),
        Case(name: "indirect not advertised", request: .indirect(indirect(.read, segments: 1)),
             limits: BlkifRequestLimits(sectors: 1000, readOnly: false, maxIndirectSegments: 0),
             expected: .tooManySegments(count: 1, maximum: 0)),
        Case(name: "indirect with more pages than needed", request: .indirect(indirect(.read, segments: 256, grefs: [1, 2])),
             limits: disk, expected: .indirectPageCountMismatch(grefs: 2, needed: 1)),
        Case(name: "indirect past 8 pages", request: .indirect(indirect(.read, segments: 4097, grefs: [1, 2, 3, 4, 5, 6, 7, 8])),
             limits: BlkifRequestLimits(sectors: 1000, readOnly: false, maxIndirectSegments: 4096),
             expected: .tooManySegments(count: 4097, maximum: 4096)),
        Case(name: "indirect write on read-only", request: .indirect(indirect(.write, segments: 1)), limits: readOnlyDisk,
             expected: .readOnlyDevice(.write)),
    ]

    @Test(arguments: cases)
    func validation(_ testCase: Case) {
        do {
            try testCase.request.validate(for: testCase.limits)
            #expect(testCase.expected == nil)
        } catch {
            #expect(error == testCase.expected)
        }
    }

    @Test func responseStatuses() {
        #expect(BlkifRequestError.unsupportedOperation(.unknown(9)).responseStatus == .notSupported)
        #expect(BlkifRequestError.noSegments.responseStatus == .error)
        #expect(BlkifRequestError.readOnlyDevice(.write).responseStatus == .error)
    }

    /// 4096-byte logical sectors: a transfer must start and end on 8 × 512 bytes, or it is
    /// refused with BLKIF_RSP_ERROR.
    @Test func alignmentToLogicalBlockSize() throws {
        let disk4K = BlkifRequestLimits(sectors: 1000, readOnly: false, maxIndirectSegments: 256, sectorsPerBlock: 8)
        let misaligned = BlkifRequestError.misaligned(sectorsPerBlock: 8)
        #expect(misaligned.responseStatus == .error)
        #expect(throws: misaligned) { try Self.rw(.read, sector: 1).validate(for: disk4K) }
        #expect(throws: misaligned) {
            try Self.rw(.write, sector: 8, [.init(gref: 1, firstSect: 0, lastSect: 0)]).validate(for: disk4K)
        }
        #expect(throws: misaligned) {
            try Self.rw(.write, sector: 8, [.init(gref: 1, firstSect: 1, lastSect: 7)]).validate(for: disk4K)
        }
        try Self.rw(.read, sector: 8).validate(for: disk4K)
        try Self.rw(.write, sector: 8, [Self.page, Self.page]).validate(for: disk4K)
        // 512-byte sectors (the default): any sector.
        try Self.rw(.read, sector: 1, [.init(gref: 1, firstSect: 3, lastSect: 3)]).validate(for: Self.disk)
        // Indirect segments are checked once read, through the same rule.
        let indirect = BlkifRequest.Indirect(indirectOperation: .read, nrSegments: 1, id: 1, sectorNumber: 1, indirectGrefs: [5])
        try BlkifRequest.indirect(indirect).validate(for: disk4K)
        #expect(throws: misaligned) { try indirect.validate(segments: [Self.page], for: disk4K) }
        // Range and read-only refusals come first.
        #expect(throws: BlkifRequestError.beyondDeviceEnd(sectorNumber: 999, sectorCount: 8, deviceSectors: 1000)) {
            try Self.rw(.read, sector: 999).validate(for: disk4K)
        }
        // A flush without data carries blkfront's (sector_t)-1: no sector, nothing to align.
        try Self.rw(.flushDiskCache, sector: .max, []).validate(for: disk4K)
        try Self.rw(.writeBarrier, sector: .max, []).validate(for: disk4K)
    }

    /// The indirect pages' segments: shape, count and the range they cover.
    @Test func indirectSegments() throws {
        let request = Self.indirect(.write, segments: 3)
        try request.validate(segments: Array(repeating: Self.page, count: 3), for: Self.disk)
        #expect(throws: BlkifRequestError.segmentCountMismatch(expected: 3, actual: 2)) {
            try request.validate(segments: [Self.page, Self.page], for: Self.disk)
        }
        #expect(throws: BlkifRequestError.segmentBeyondPage(index: 2, lastSect: 9)) {
            try request.validate(segments: [Self.page, Self.page, .init(gref: 3, firstSect: 0, lastSect: 9)], for: Self.disk)
        }
        #expect(throws: BlkifRequestError.segmentReversed(index: 0, firstSect: 7, lastSect: 6)) {
            try request.validate(segments: [.init(gref: 3, firstSect: 7, lastSect: 6), Self.page, Self.page], for: Self.disk)
        }
        let nearEnd = BlkifRequest.Indirect(indirectOperation: .read, nrSegments: 3, id: 1, sectorNumber: 980, indirectGrefs: [5])
        #expect(throws: BlkifRequestError.beyondDeviceEnd(sectorNumber: 980, sectorCount: 24, deviceSectors: 1000)) {
            try nearEnd.validate(segments: Array(repeating: Self.page, count: 3), for: Self.disk)
        }
        // 2 + 8 + 8 sectors end exactly at the device end.
        try nearEnd.validate(segments: [.init(gref: 1, firstSect: 6, lastSect: 7), Self.page, Self.page], for: Self.disk)
    }
}
