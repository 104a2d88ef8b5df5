@testable import Blkif
import CXenBlkif
import Engine
import Testing

/// Frontend encode → backend decode and back, for every operation and ABI, plus the
/// byte-exact wire images.
@Suite struct RingCodecTests {
    static let sampleRequests: [BlkifRequest] = [
        .readWrite(.init(operation: .read, handle: 51712, id: 0x0123_4567_89AB_CDEF, sectorNumber: 0x1_0000_0001,
                         segments: segments([.init(gref: 8, firstSect: 0, lastSect: 7)]))),
        .readWrite(.init(operation: .write, handle: 3, id: 2, sectorNumber: 40,
                         segments: segments((0..<11).map { BlkifSegment(gref: 100 + UInt32($0), firstSect: UInt8($0 % 8), lastSect: 7) }))),
        .readWrite(.init(operation: .writeBarrier, id: 3, sectorNumber: 8,
                         segments: segments([.init(gref: 0xFFFF_FFFF, firstSect: 1, lastSect: 2)]))),
        .readWrite(.init(operation: .flushDiskCache, id: 4, sectorNumber: 0)),
        .discard(.init(secure: true, handle: 7, id: 5, sectorNumber: 1 << 40, nrSectors: 0xFFFF_0000_1234)),
        .discard(.init(secure: false, id: 6, sectorNumber: 0, nrSectors: 1)),
        .indirect(.init(indirectOperation: .write, nrSegments: 256, handle: 9, id: 7, sectorNumber: 123_456,
                        indirectGrefs: [77])),
        .indirect(.init(indirectOperation: .read, nrSegments: 4096, id: 8, sectorNumber: 1,
                        indirectGrefs: [1, 2, 3, 4, 5, 6, 7, 0xDEAD_BEEF])),
        .other(operation: .unknown(4), id: 9),
        .other(operation: .unknown(255), id: .max),
    ]

    @Test(arguments: allProtocols)
    func requestsRoundTrip(abi: BlkifProtocol) throws {
        var pair = RingPair(protocol: abi)
        // More requests than ring slots: every slot and the index wrap of the mask are used.
        for round in 0..<5 {
            for request in Self.sampleRequests {
                let taken = try pair.send(request)
                #expect(taken == request, "round \(round)")
                let status: BlkifResponseStatus = request.id % 2 == 0 ? .okay : .notSupported
                let response = try pair.answer(BlkifResponse(answering: request, status: status))
                #expect(response == BlkifResponse(id: request.id, operation: request.responseOperation, status: status))
            }
        }
    }

    @Test(arguments: allProtocols)
    func responseStatusesRoundTrip(abi: BlkifProtocol) throws {
        var pair = RingPair(protocol: abi)
        for status in [BlkifResponseStatus.okay, .error, .notSupported, .unknown(-32768), .unknown(5)] {
            _ = try pair.send(.readWrite(.init(operation: .flushDiskCache, id: 1, sectorNumber: 0)))
            let response = try pair.answer(BlkifResponse(id: 0xFEED, operation: .unknown(200), status: status))
            #expect(response == BlkifResponse(id: 0xFEED, operation: .unknown(200), status: status))
        }
    }

    /// The frontend's native encoding read back through the C structs of blkif.h.
    @Test func nativeEncodingReadsBackAsCStructs() {
        let pair = RingPair(protocol: .native)
        var front = pair.front
        let entry = pair.shared.entry(0)

        _ = front.putRequest(Self.sampleRequests[1])
        let rw = entry.load(as: blkif_request.self)
        #expect(rw.operation == 1 && rw.nr_segments == 11 && rw.handle == 3 && rw.id == 2 && rw.sector_number == 40)
        #expect(rw.seg.10.gref == 110 && rw.seg.10.first_sect == 2 && rw.seg.10.last_sect == 7)

        _ = front.putRequest(Self.sampleRequests[4])
        let discard = pair.shared.entry(1).load(as: blkif_request_discard.self)
        #expect(discard.operation == 5 && discard.flag == 1 && discard.handle == 7 && discard.id == 5)
        #expect(discard.sector_number == 1 << 40 && discard.nr_sectors == 0xFFFF_0000_1234)

        _ = front.putRequest(Self.sampleRequests[7])
        let indirect = pair.shared.entry(2).load(as: blkif_request_indirect.self)
        #expect(indirect.operation == 6 && indirect.indirect_op == 0 && indirect.nr_segments == 4096)
        #expect(indirect.id == 8 && indirect.sector_number == 1 && indirect.handle == 0)
        #expect(indirect.indirect_grefs.0 == 1 && indirect.indirect_grefs.7 == 0xDEAD_BEEF)
    }

    /// Bytes written by C through struct blkif_request decode as the same request.
    @Test func cWrittenRequestDecodes() throws {
        var pair = RingPair(protocol: .native)
        var request = blkif_request()
        request.operation = UInt8(BLKIF_OP_WRITE)
        request.nr_segments = 2
        request.handle = 51712
        request.id = 0xABCD
        request.sector_number = 2048
        request.seg.0 = blkif_request_segment(gref: 21, first_sect: 0, last_sect: 7)
        request.seg.1 = blkif_request_segment(gref: 22, first_sect: 0, last_sect: 3)
        pair.shared.entry(0).storeBytes(of: request, as: blkif_request.self)
        pair.shared.setIndex(1, at: SharedRing.requestProducerOffset)

        _ = try pair.back.unconsumedRequests()
        let taken = pair.back.takeRequest()
        #expect(taken == .readWrite(.init(operation: .write, handle: 51712, id: 0xABCD, sectorNumber: 2048, segments: segments([
            .init(gref: 21, firstSect: 0, lastSect: 7), .init(gref: 22, firstSect: 0, lastSect: 3),
        ]))))
    }

    /// x86_32 wire image, byte for byte, independent of the decoder.
    @Test func x86_32RequestImage() {
        let pair = RingPair(protocol: .x86_32)
        var front = pair.front
        _ = front.putRequest(.readWrite(.init(operation: .write, handle: 0x0201, id: 0x0807_0605_0403_0201,
                                              sectorNumber: 0x1817_1615_1413_1211,
                                              segments: segments([.init(gref: 0x2423_2221, firstSect: 3, lastSect: 6)]))))
        _ = front.putRequest(.discard(.init(secure: true, id: 1, sectorNumber: 2, nrSectors: 0x3837_3635_3433_3231)))
        let first = pair.memory.bytes(at: BlkifLayout.ringHeaderSize, count: 108)
        #expect(Array(first[0..<28]) == [
            1, 1, 0x01, 0x02, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08,
            0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, 0x21, 0x22, 0x23, 0x24, 3, 6, 0, 0,
        ])
        #expect(first[28...].allSatisfy { $0 == 0 })
        let second = pair.memory.bytes(at: BlkifLayout.ringHeaderSize + 108, count: 108)
        #expect(Array(second[0..<28]) == [
            5, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0,
            0x31, 0x32, 0x33, 0x34, 0x35, 0x36, 0x37, 0x38,
        ])
        // The byte after the entry (next slot) is untouched.
        #expect(pair.memory.bytes(at: BlkifLayout.ringHeaderSize + 216, count: 1) == [0xAA])
    }

    /// XSA-216: a response overwrites every byte of its own size, padding included, and
    /// nothing beyond.
    @Test(arguments: allProtocols)
    func responseLeavesNoStaleBytes(abi: BlkifProtocol) throws {
        var pair = RingPair(protocol: abi)
        let layout = abi.layout
        _ = try pair.send(.readWrite(.init(operation: .flushDiskCache, id: 1, sectorNumber: 0)))
        let entry = pair.shared.entry(0)
        entry.initializeMemory(as: UInt8.self, repeating: 0xAA, count: layout.requestSize)
        pair.back.putResponse(BlkifResponse(id: 0x0102_0304_0506_0708, operation: .write, status: .error))
        var expected: [UInt8] = [8, 7, 6, 5, 4, 3, 2, 1, 1, 0, 0xFF, 0xFF]
        if layout.responseSize == 16 { expected += [0, 0, 0, 0] }
        let written = pair.memory.bytes(at: BlkifLayout.ringHeaderSize, count: layout.requestSize)
        #expect(Array(written[0..<layout.responseSize]) == expected)
        #expect(written[layout.responseSize...].allSatisfy { $0 == 0xAA })
    }

    /// A request entry is fully rewritten: unused segments and padding come out zero.
    @Test(arguments: allProtocols)
    func requestLeavesNoStaleBytes(abi: BlkifProtocol) {
        let pair = RingPair(protocol: abi)
        var front = pair.front
        _ = front.putRequest(.other(operation: .unknown(4), id: 0))
        let written = pair.memory.bytes(at: BlkifLayout.ringHeaderSize, count: abi.layout.requestSize)
        #expect(written[0] == 4)
        #expect(written[1...].allSatisfy { $0 == 0 })
    }

    /// A lying nr_segments decodes without trapping; validation rejects it later.
    @Test(arguments: allProtocols)
    func oversizedSegmentCountDecodes(abi: BlkifProtocol) throws {
        var pair = RingPair(protocol: abi)
        var request = BlkifRequest.ReadWrite(operation: .read, id: 1, sectorNumber: 0,
                                             segments: segments([.init(gref: 1, firstSect: 0, lastSect: 0)]))
        request.nrSegments = 255
        guard case .readWrite(let taken)? = try pair.send(.readWrite(request)) else {
            Issue.record("not decoded as read/write")
            return
        }
        #expect(taken.nrSegments == 255)
        #expect(taken.segments.count == 11)
        #expect(taken.segments.first == BlkifSegment(gref: 1, firstSect: 0, lastSect: 0))
    }

    /// Indirect requests claiming more segments than 8 pages hold decode 8 grefs.
    @Test func oversizedIndirectDecodes() throws {
        var pair = RingPair()
        let taken = try pair.send(.indirect(.init(indirectOperation: .read, nrSegments: 65535, id: 1, sectorNumber: 0,
                                                  indirectGrefs: [1, 2, 3, 4, 5, 6, 7, 8])))
        guard case .indirect(let indirect)? = taken else {
            Issue.record("not decoded as indirect")
            return
        }
        #expect(indirect.nrSegments == 65535)
        #expect(Array(indirect.indirectGrefs) == [1, 2, 3, 4, 5, 6, 7, 8])
    }

    @Test func indirectPagesRoundTrip() {
        let pages = RingMemory(pages: 2, filling: 0xAA)
        let all = (0..<700).map { BlkifSegment(gref: UInt32($0) * 3, firstSect: UInt8($0 % 8), lastSect: 7) }
        BlkifIndirectPage.write(all[0..<512], to: pages.pointer)
        BlkifIndirectPage.write(all[512...], to: pages.pointer + Blkif.pageSize)
        // Unused entries of the last page are zeroed.
        #expect(pages.bytes(at: Blkif.pageSize + 188 * 8, count: Blkif.pageSize - 188 * 8).allSatisfy { $0 == 0 })
        // Each entry: gref, first_sect, last_sect, zero padding.
        #expect(pages.bytes(at: 5 * 8, count: 8) == [15, 0, 0, 0, 5, 7, 0, 0])

        let request = BlkifRequest.Indirect(indirectOperation: .write, nrSegments: 700, id: 1, sectorNumber: 0,
                                            indirectGrefs: [10, 11])
        var segments: [BlkifSegment] = []
        BlkifIndirectPage.readSegments(of: request, pages: [UnsafeRawPointer(pages.pointer),
                                                            UnsafeRawPointer(pages.pointer + Blkif.pageSize)],
                                       into: &segments)
        #expect(segments == all)
        // Reuse keeps nothing from the previous request.
        let shorter = BlkifRequest.Indirect(indirectOperation: .write, nrSegments: 3, id: 2, sectorNumber: 0,
                                            indirectGrefs: [10])
        BlkifIndirectPage.readSegments(of: shorter, pages: [UnsafeRawPointer(pages.pointer)], into: &segments)
        #expect(segments == Array(all[0..<3]))
    }
}
