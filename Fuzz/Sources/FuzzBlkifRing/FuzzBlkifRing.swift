// A hostile frontend's ring: the input is the shared ring's pages (indices and entries) and
// the contents of the pages its indirect grants name. Every request the back ring hands out
// is validated as the data plane does; one that passes must describe a transfer the device
// can take, and must survive an encode/decode round trip unchanged.
import Blkif
import FuzzSupport

/// Ring pages (at most 16) followed by the 8 pages indirect grants map to, reused per input.
private let ringPages = BlkifLayout.maxRingPages
private let indirectPageSlots = Blkif.maxIndirectPagesPerRequest
// libFuzzer calls the target from one thread.
nonisolated(unsafe) private let memory = UnsafeMutableRawPointer.allocate(byteCount: (ringPages + indirectPageSlots) * Blkif.pageSize,
                                                      alignment: Blkif.pageSize)
nonisolated(unsafe) private let scratchEntry = UnsafeMutableRawPointer.allocate(byteCount: 128, alignment: 8)

private struct Input {
    let bytes: UnsafeBufferPointer<UInt8>
    var offset = 0

    mutating func byte() -> UInt8 {
        guard offset < bytes.count else { return 0 }
        defer { offset += 1 }
        return bytes[offset]
    }

    mutating func u64() -> UInt64 { (0..<8).reduce(0) { value, shift in value | UInt64(byte()) << (8 * UInt64(shift)) } }

    /// Fills `count` bytes at `destination` with what is left, repeated from `start`; zeros
    /// when nothing is left. The copy doubles what is filled, so a short input costs few calls.
    func fill(_ destination: UnsafeMutableRawPointer, count: Int, from start: Int) {
        let rest = bytes.count - offset
        guard rest > 0 else {
            destination.initializeMemory(as: UInt8.self, repeating: 0, count: count)
            return
        }
        let skip = start % rest
        var filled = min(count, rest - skip)
        destination.copyMemory(from: bytes.baseAddress! + offset + skip, byteCount: filled)
        if filled < count && skip > 0 {
            let wrapped = min(count - filled, skip)
            (destination + filled).copyMemory(from: bytes.baseAddress! + offset, byteCount: wrapped)
            filled += wrapped
        }
        while filled < count {
            let chunk = min(filled, count - filled)
            (destination + filled).copyMemory(from: UnsafeRawPointer(destination), byteCount: chunk)
            filled += chunk
        }
    }
}

private func checkTransfer(_ operation: BlkifOperation, _ sectorNumber: UInt64, _ segments: some Collection<BlkifSegment>,
                           limits: BlkifRequestLimits) {
    var sectors: UInt64 = 0
    for segment in segments {
        check(segment.firstSect <= segment.lastSect && segment.lastSect < Blkif.sectorsPerPage, "segment \(segment)")
        sectors += segment.sectorCount
    }
    guard sectors > 0 else { return }
    check(!(limits.readOnly && operation.modifiesDisk), "\(operation) on a read-only device")
    let (end, wrapped) = sectorNumber.addingReportingOverflow(sectors)
    check(!wrapped && end <= limits.sectors, "sectors \(sectorNumber)+\(sectors) past \(limits.sectors)")
    check(limits.sectorsPerBlock <= 1 || sectorNumber % limits.sectorsPerBlock == 0, "misaligned start")
}

private func checkRoundTrip(_ request: BlkifRequest, layout: BlkifLayout) {
    request.encode(into: scratchEntry, layout: layout)
    let decoded = BlkifRequest(decoding: UnsafeRawPointer(scratchEntry), layout: layout)
    check(decoded == request, "round trip \(request) -> \(decoded)")
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzBlkifRing(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    guard let data else { return 0 }
    var input = Input(bytes: UnsafeBufferPointer(start: data, count: size))
    let shape = input.byte()
    let abi: BlkifProtocol = [.native, .x86_32, .x86_64][Int(shape % 3)]
    let pageCount = 1 << Int((shape >> 2) % 5)
    let flags = input.byte()
    let limits = BlkifRequestLimits(
        sectors: input.u64() >> UInt64(flags >> 2), readOnly: flags & 1 != 0,
        maxIndirectSegments: Int(input.byte()) * 17 % (Blkif.maxIndirectSegments + 1),
        sectorsPerBlock: flags & 2 != 0 ? 8 : 1)
    input.fill(memory, count: pageCount * Blkif.pageSize, from: 0)
    // The pages indirect grants map to (grant g is slot g % 8), each from its own offset.
    for slot in 0..<indirectPageSlots {
        input.fill(memory + (ringPages + slot) * Blkif.pageSize, count: Blkif.pageSize, from: slot * 1031)
    }

    let shared = SharedRing(memory: memory, pageCount: pageCount, protocol: abi)
    // At most 63 requests outstanding: enough for every decoding path and index wrap, few
    // enough to keep executions fast.
    var ring = BackRing(attaching: shared, at: shared.requestProducer &- UInt32(input.byte() & 0x3f))
    var segments: [BlkifSegment] = []
    // Two passes, as the ring worker makes: take what is there, answer it, look again.
    for _ in 0..<2 {
        guard (try? ring.unconsumedRequests()) != nil else { return 0 }
        while let request = ring.takeRequest() {
            defer { ring.putResponse(BlkifResponse(answering: request, status: .okay)) }
            guard (try? request.validate(for: limits)) != nil else { continue }
            checkRoundTrip(request, layout: shared.layout)
            switch request {
            case .readWrite(let rw):
                check(Int(rw.nrSegments) == rw.segments.count && rw.segments.count <= Blkif.maxSegmentsPerRequest, "nr_segments")
                checkTransfer(rw.operation, rw.sectorNumber, rw.segments, limits: limits)
            case .discard(let discard):
                check(!limits.readOnly, "discard on a read-only device")
                let (end, wrapped) = discard.sectorNumber.addingReportingOverflow(discard.nrSectors)
                check(!wrapped && end <= limits.sectors, "discard past the end")
            case .indirect(let indirect):
                let pages = indirect.indirectGrefs.map { gref in
                    UnsafeRawPointer(memory + (ringPages + Int(gref % UInt32(indirectPageSlots))) * Blkif.pageSize)
                }
                BlkifIndirectPage.readSegments(of: indirect, pages: pages, into: &segments)
                guard (try? indirect.validate(segments: segments, for: limits)) != nil else { continue }
                check(segments.count == Int(indirect.nrSegments) && segments.count <= limits.maxIndirectSegments, "indirect count")
                checkTransfer(indirect.indirectOperation, indirect.sectorNumber, segments, limits: limits)
            case .other:
                check(false, "an unknown operation validated")
            }
        }
        _ = ring.pushResponsesAndCheckNotify()
    }
    return 0
}

@_cdecl("FuzzBlkifRing_main")
public func main(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> CInt {
    runLibFuzzer(argc, argv, fuzzBlkifRing)
}
