// Decoding and encoding of ring entries and indirect segment pages.
//
// The other end can rewrite shared memory at any moment. Decoding therefore first copies an
// entry word by word with single-access (relaxed atomic) loads, then reads only the copy: every
// byte is fetched once, so what is validated is what is used (XSA-155). Encoding writes every
// byte of what it owns, padding included, so no stale data leaks to the other end (XSA-216).
// Xen guests on x86 and Arm are little-endian; the wire values are converted accordingly.

import Synchronization

// MARK: Single-access loads and stores on shared memory

@inline(__always)
func loadOnce(_ pointer: UnsafeRawPointer) -> UInt32 {
    UInt32(littleEndian: pointer.assumingMemoryBound(to: Atomic<UInt32>.self).pointee.load(ordering: .relaxed))
}

@inline(__always)
func loadOnce64(_ pointer: UnsafeRawPointer) -> UInt64 {
    UInt64(littleEndian: pointer.assumingMemoryBound(to: Atomic<UInt64>.self).pointee.load(ordering: .relaxed))
}

@inline(__always)
func storeOnce(_ value: UInt32, _ pointer: UnsafeMutableRawPointer) {
    pointer.assumingMemoryBound(to: Atomic<UInt32>.self).pointee.store(value.littleEndian, ordering: .relaxed)
}

extension UnsafeMutableRawPointer {
    @inline(__always)
    func storeLittleEndian<T: FixedWidthInteger>(_ value: T, at offset: Int) {
        storeBytes(of: value.littleEndian, toByteOffset: offset, as: T.self)
    }
}

// MARK: Entry copy

/// A ring entry copied out of shared memory; all decoding reads this copy.
struct RingEntryCopy {
    /// The largest entry (112 bytes) in 32-bit words; entries are 4-byte aligned in every ABI.
    private var words: InlineArray<28, UInt32>

    init(copying entry: UnsafeRawPointer, byteCount: Int) {
        words = InlineArray(repeating: 0)
        for index in 0..<(byteCount / 4) {
            words[index] = loadOnce(entry + index * 4)
        }
    }

    func u8(_ offset: Int) -> UInt8 {
        UInt8(truncatingIfNeeded: words[offset >> 2] >> ((offset & 3) * 8))
    }

    /// `offset` is 2-byte aligned in every layout.
    func u16(_ offset: Int) -> UInt16 {
        UInt16(truncatingIfNeeded: words[offset >> 2] >> ((offset & 3) * 8))
    }

    /// `offset` is 4-byte aligned in every layout.
    func u32(_ offset: Int) -> UInt32 { words[offset >> 2] }

    func u64(_ offset: Int) -> UInt64 {
        UInt64(words[offset >> 2]) | UInt64(words[(offset >> 2) + 1]) << 32
    }

    func segment(_ offset: Int) -> BlkifSegment {
        BlkifSegment(gref: u32(offset), firstSect: u8(offset + 4), lastSect: u8(offset + 5))
    }
}

// MARK: Requests

extension BlkifRequest {
    /// Decodes a request entry. Total: every byte pattern decodes, unknown operations to
    /// `.other`; whether the request may be served is `validate(for:)`'s call.
    init(copy entry: RingEntryCopy, layout: BlkifLayout) {
        let operation = BlkifOperation(rawValue: entry.u8(BlkifLayout.operationOffset))
        let id = entry.u64(layout.idOffset)
        let sectorNumber = entry.u64(layout.sectorNumberOffset)
        switch operation {
        case .read, .write, .writeBarrier, .flushDiskCache:
            let nrSegments = entry.u8(BlkifLayout.byte1Offset)
            var segments = FixedCapacityList<11, BlkifSegment>()
            for index in 0..<min(Int(nrSegments), Blkif.maxSegmentsPerRequest) {
                segments.append(entry.segment(layout.segmentsOffset + index * BlkifSegment.byteCount))
            }
            var request = ReadWrite(operation: operation, handle: entry.u16(BlkifLayout.halfword2Offset), id: id,
                                    sectorNumber: sectorNumber, segments: segments)
            request.nrSegments = nrSegments
            self = .readWrite(request)
        case .discard:
            self = .discard(Discard(
                secure: entry.u8(BlkifLayout.byte1Offset) & Discard.secureFlag != 0,
                handle: entry.u16(BlkifLayout.halfword2Offset), id: id, sectorNumber: sectorNumber,
                nrSectors: entry.u64(layout.discardNrSectorsOffset)))
        case .indirect:
            let nrSegments = entry.u16(BlkifLayout.halfword2Offset)
            var grefs = FixedCapacityList<8, UInt32>()
            for index in 0..<min(Blkif.indirectPages(forSegments: Int(nrSegments)), Blkif.maxIndirectPagesPerRequest) {
                grefs.append(entry.u32(layout.indirectGrefsOffset + index * 4))
            }
            self = .indirect(Indirect(
                indirectOperation: BlkifOperation(rawValue: entry.u8(BlkifLayout.byte1Offset)),
                nrSegments: nrSegments, handle: entry.u16(layout.indirectHandleOffset), id: id,
                sectorNumber: sectorNumber, indirectGrefs: grefs))
        case .unknown:
            self = .other(operation: operation, id: id)
        }
    }

    /// Decodes a request from memory only this process writes (a copy it keeps, such as the
    /// data plane's journal); ring entries go through `BackRing.takeRequest`.
    public init(decoding entry: UnsafeRawPointer, layout: BlkifLayout) {
        self.init(copy: RingEntryCopy(copying: entry, byteCount: layout.requestSize), layout: layout)
    }

    /// Writes the request into a ring entry, zeroing the whole entry first so unused
    /// segments and padding hold no stale bytes. Fields are written as given, even
    /// inconsistent ones (a test frontend may lie on purpose).
    public func encode(into entry: UnsafeMutableRawPointer, layout: BlkifLayout) {
        entry.initializeMemory(as: UInt8.self, repeating: 0, count: layout.requestSize)
        entry.storeLittleEndian(operation.rawValue, at: BlkifLayout.operationOffset)
        entry.storeLittleEndian(id, at: layout.idOffset)
        switch self {
        case .readWrite(let request):
            entry.storeLittleEndian(request.nrSegments, at: BlkifLayout.byte1Offset)
            entry.storeLittleEndian(request.handle, at: BlkifLayout.halfword2Offset)
            entry.storeLittleEndian(request.sectorNumber, at: layout.sectorNumberOffset)
            for (index, segment) in request.segments.enumerated() {
                segment.encode(into: entry + layout.segmentsOffset + index * BlkifSegment.byteCount)
            }
        case .discard(let request):
            entry.storeLittleEndian(request.secure ? Discard.secureFlag : 0, at: BlkifLayout.byte1Offset)
            entry.storeLittleEndian(request.handle, at: BlkifLayout.halfword2Offset)
            entry.storeLittleEndian(request.sectorNumber, at: layout.sectorNumberOffset)
            entry.storeLittleEndian(request.nrSectors, at: layout.discardNrSectorsOffset)
        case .indirect(let request):
            entry.storeLittleEndian(request.indirectOperation.rawValue, at: BlkifLayout.byte1Offset)
            entry.storeLittleEndian(request.nrSegments, at: BlkifLayout.halfword2Offset)
            entry.storeLittleEndian(request.sectorNumber, at: layout.sectorNumberOffset)
            entry.storeLittleEndian(request.handle, at: layout.indirectHandleOffset)
            for (index, gref) in request.indirectGrefs.enumerated() {
                entry.storeLittleEndian(gref, at: layout.indirectGrefsOffset + index * 4)
            }
        case .other:
            break
        }
    }
}

extension BlkifRequest.Discard {
    /// BLKIF_DISCARD_SECURE.
    static let secureFlag: UInt8 = 1
}

extension BlkifSegment {
    /// gref 0, first_sect 4, last_sect 5, two padding bytes.
    func encode(into slot: UnsafeMutableRawPointer) {
        slot.storeLittleEndian(gref, at: 0)
        slot.storeLittleEndian(firstSect, at: 4)
        slot.storeLittleEndian(lastSect, at: 5)
        slot.storeLittleEndian(UInt16(0), at: 6)
    }

    /// One 8-byte load, so the three fields come from a single fetch.
    init(fetchingOnce slot: UnsafeRawPointer) {
        let raw = loadOnce64(slot)
        self.init(gref: UInt32(truncatingIfNeeded: raw), firstSect: UInt8(truncatingIfNeeded: raw >> 32),
                  lastSect: UInt8(truncatingIfNeeded: raw >> 40))
    }
}

// MARK: Responses

extension BlkifResponse {
    init(copy entry: RingEntryCopy) {
        self.init(id: entry.u64(BlkifLayout.responseIdOffset),
                  operation: BlkifOperation(rawValue: entry.u8(BlkifLayout.responseOperationOffset)),
                  status: BlkifResponseStatus(rawValue: Int16(bitPattern: entry.u16(BlkifLayout.responseStatusOffset))))
    }

    /// Writes each field and each padding byte of the response individually (XSA-216);
    /// bytes past responseSize belong to the request that shared the entry and are left alone.
    func encode(into entry: UnsafeMutableRawPointer, layout: BlkifLayout) {
        entry.storeLittleEndian(id, at: BlkifLayout.responseIdOffset)
        entry.storeLittleEndian(operation.rawValue, at: BlkifLayout.responseOperationOffset)
        entry.storeLittleEndian(UInt8(0), at: BlkifLayout.responseOperationOffset + 1)
        entry.storeLittleEndian(status.rawValue, at: BlkifLayout.responseStatusOffset)
        if layout.responseSize > 12 {
            entry.storeLittleEndian(UInt32(0), at: 12)
        }
    }
}

// MARK: Indirect segment pages

/// A granted page of struct blkif_request_segment, 512 per page.
public enum BlkifIndirectPage {
    /// Appends `count` segments (at most 512) read from a mapped indirect page, each entry
    /// fetched once. `segments` can be reused across requests to avoid allocating.
    public static func readSegments(from page: UnsafeRawPointer, count: Int, appendingTo segments: inout [BlkifSegment]) {
        precondition(count >= 0 && count <= Blkif.segmentsPerIndirectPage, "\(count) segments in one indirect page")
        for index in 0..<count {
            segments.append(BlkifSegment(fetchingOnce: page + index * BlkifSegment.byteCount))
        }
    }

    /// Reads the segments of `request` from its mapped indirect pages (in indirectGrefs
    /// order). Call after `request` validated, so the page count matches nrSegments.
    public static func readSegments(of request: BlkifRequest.Indirect, pages: some Collection<UnsafeRawPointer>,
                                    into segments: inout [BlkifSegment]) {
        segments.removeAll(keepingCapacity: true)
        var remaining = Int(request.nrSegments)
        for page in pages where remaining > 0 {
            let count = min(remaining, Blkif.segmentsPerIndirectPage)
            readSegments(from: page, count: count, appendingTo: &segments)
            remaining -= count
        }
    }

    /// Fills a page with up to 512 segments and zeroes the rest of it (frontend side).
    public static func write(_ segments: some Collection<BlkifSegment>, to page: UnsafeMutableRawPointer) {
        precondition(segments.count <= Blkif.segmentsPerIndirectPage, "\(segments.count) segments in one indirect page")
        page.initializeMemory(as: UInt8.self, repeating: 0, count: Blkif.pageSize)
        for (index, segment) in segments.enumerated() {
            segment.encode(into: page + index * BlkifSegment.byteCount)
        }
    }
}
