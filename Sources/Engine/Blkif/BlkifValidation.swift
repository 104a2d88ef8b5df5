// Backend-side checks of a decoded request against the device, following the hardening in
// Linux xen-blkback (dispatch_rw_block_io, xen_vbd_translate, xen_blkbk_parse_indirect):
// a request that fails gets an error response; the ring keeps being served.

/// What a request is checked against.
public struct BlkifRequestLimits: Sendable, Equatable {
    /// Device size in 512-byte sectors.
    public var sectors: UInt64
    public var readOnly: Bool
    /// The advertised feature-max-indirect-segments; 0 when indirect requests are not offered.
    public var maxIndirectSegments: Int
    /// The device's logical block size (sector-size) in 512-byte sectors: every data transfer
    /// must start and end on it (O_DIRECT needs it; Linux blkback refuses the rest too).
    /// 1 or less: any sector.
    public var sectorsPerBlock: UInt64

    public init(sectors: UInt64, readOnly: Bool, maxIndirectSegments: Int, sectorsPerBlock: UInt64 = 1) {
        precondition(maxIndirectSegments >= 0 && maxIndirectSegments <= Blkif.maxIndirectSegments,
                     "feature-max-indirect-segments must be within 0...\(Blkif.maxIndirectSegments)")
        self.sectors = sectors
        self.readOnly = readOnly
        self.maxIndirectSegments = maxIndirectSegments
        self.sectorsPerBlock = sectorsPerBlock
    }
}

/// Why a request is refused.
public enum BlkifRequestError: Error, Sendable, Equatable {
    /// An operation without a layout here (BLKIF_OP_RESERVED_1, unassigned numbers).
    case unsupportedOperation(BlkifOperation)
    /// READ or WRITE with nr_segments 0.
    case noSegments
    case tooManySegments(count: Int, maximum: Int)
    /// indirect_op other than READ or WRITE.
    case invalidIndirectOperation(BlkifOperation)
    /// The grants given for indirect pages do not match ceil(nr_segments / 512).
    case indirectPageCountMismatch(grefs: Int, needed: Int)
    /// last_sect beyond the 4 KiB page.
    case segmentBeyondPage(index: Int, lastSect: UInt8)
    case segmentReversed(index: Int, firstSect: UInt8, lastSect: UInt8)
    /// The sector range ends past the device or wraps around.
    case beyondDeviceEnd(sectorNumber: UInt64, sectorCount: UInt64, deviceSectors: UInt64)
    case readOnlyDevice(BlkifOperation)
    /// Indirect segments supplied do not match nr_segments.
    case segmentCountMismatch(expected: Int, actual: Int)
    /// The sector number, a segment's first_sect or its length is not a multiple of the
    /// device's logical block size.
    case misaligned(sectorsPerBlock: UInt64)

    /// The status the frontend gets.
    public var responseStatus: BlkifResponseStatus {
        if case .unsupportedOperation = self { return .notSupported }
        return .error
    }
}

extension BlkifRequest {
    /// Checks everything the ring entry alone tells. For indirect requests the segments are
    /// in other pages: check them with `Indirect.validate(segments:for:)` once read.
    public func validate(for limits: BlkifRequestLimits) throws(BlkifRequestError) {
        switch self {
        case .readWrite(let request): try request.validate(for: limits)
        case .discard(let request): try request.validate(for: limits)
        case .indirect(let request): try request.validateHeader(for: limits)
        case .other(let operation, _): throw .unsupportedOperation(operation)
        }
    }
}

extension BlkifRequest.ReadWrite {
    public func validate(for limits: BlkifRequestLimits) throws(BlkifRequestError) {
        let count = Int(nrSegments)
        // Only flushes and barriers may come without data.
        if count == 0 && (operation == .read || operation == .write) { throw .noSegments }
        if count > Blkif.maxSegmentsPerRequest {
            throw .tooManySegments(count: count, maximum: Blkif.maxSegmentsPerRequest)
        }
        try validateTransfer(operation: operation, sectorNumber: sectorNumber, segments: segments, limits: limits)
    }
}

extension BlkifRequest.Discard {
    public func validate(for limits: BlkifRequestLimits) throws(BlkifRequestError) {
        if limits.readOnly { throw .readOnlyDevice(.discard) }
        try validateRange(sectorNumber: sectorNumber, sectorCount: nrSectors, limits: limits)
    }
}

extension BlkifRequest.Indirect {
    /// Checks done before the indirect pages are mapped.
    public func validateHeader(for limits: BlkifRequestLimits) throws(BlkifRequestError) {
        guard indirectOperation == .read || indirectOperation == .write else {
            throw .invalidIndirectOperation(indirectOperation)
        }
        let count = Int(nrSegments)
        if count == 0 { throw .noSegments }
        if count > limits.maxIndirectSegments {
            throw .tooManySegments(count: count, maximum: limits.maxIndirectSegments)
        }
        let needed = Blkif.indirectPages(forSegments: count)
        if indirectGrefs.count != needed {
            throw .indirectPageCountMismatch(grefs: indirectGrefs.count, needed: needed)
        }
        if limits.readOnly && indirectOperation == .write { throw .readOnlyDevice(.write) }
    }

    /// Checks the segments read from the indirect pages.
    public func validate(segments: some Collection<BlkifSegment>, for limits: BlkifRequestLimits) throws(BlkifRequestError) {
        if segments.count != Int(nrSegments) {
            throw .segmentCountMismatch(expected: Int(nrSegments), actual: segments.count)
        }
        try validateTransfer(operation: indirectOperation, sectorNumber: sectorNumber, segments: segments, limits: limits)
    }
}

/// Segment shape, device access mode, sector range and alignment of a data transfer.
private func validateTransfer(operation: BlkifOperation, sectorNumber: UInt64, segments: some Collection<BlkifSegment>,
                              limits: BlkifRequestLimits) throws(BlkifRequestError) {
    var sectorCount: UInt64 = 0
    for (index, segment) in segments.enumerated() {
        if segment.lastSect >= Blkif.sectorsPerPage {
            throw .segmentBeyondPage(index: index, lastSect: segment.lastSect)
        }
        if segment.lastSect < segment.firstSect {
            throw .segmentReversed(index: index, firstSect: segment.firstSect, lastSect: segment.lastSect)
        }
        sectorCount += segment.sectorCount
    }
    // A flush or barrier without data touches no sectors (CVE-2013-2140 is about data), and
    // its sector number means nothing: blkfront sends (sector_t)-1.
    guard sectorCount > 0 else { return }
    if limits.readOnly && operation.modifiesDisk { throw .readOnlyDevice(operation) }
    try validateRange(sectorNumber: sectorNumber, sectorCount: sectorCount, limits: limits)
    try validateAlignment(sectorNumber: sectorNumber, segments: segments, limits: limits)
}

/// Checked after shape and range: a request also wrong in those is refused for them.
private func validateAlignment(sectorNumber: UInt64, segments: some Collection<BlkifSegment>,
                               limits: BlkifRequestLimits) throws(BlkifRequestError) {
    let block = limits.sectorsPerBlock
    guard block > 1 else { return }
    let aligned = sectorNumber % block == 0 && segments.allSatisfy {
        UInt64($0.firstSect) % block == 0 && $0.sectorCount % block == 0
    }
    if !aligned { throw .misaligned(sectorsPerBlock: block) }
}

private func validateRange(sectorNumber: UInt64, sectorCount: UInt64, limits: BlkifRequestLimits) throws(BlkifRequestError) {
    let (end, wrapped) = sectorNumber.addingReportingOverflow(sectorCount)
    if wrapped || end > limits.sectors {
        throw .beyondDeviceEnd(sectorNumber: sectorNumber, sectorCount: sectorCount, deviceSectors: limits.sectors)
    }
}
