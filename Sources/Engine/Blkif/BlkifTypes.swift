// The blkif request/response vocabulary of <xen/io/blkif.h>, as Swift values that carry no
// pointers into shared memory. Both ring ends use them: the backend decodes requests and
// encodes responses, the simulated frontend does the reverse.

/// Protocol constants from blkif.h.
public enum Blkif {
    /// BLKIF_MAX_SEGMENTS_PER_REQUEST: segments carried directly in a ring entry.
    public static let maxSegmentsPerRequest = 11
    /// BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST: grant references in an indirect request.
    public static let maxIndirectPagesPerRequest = 8
    /// Xen pages are 4 KiB whatever the host page size.
    public static let pageSize = 4096
    /// Sector numbers are always in 512-byte units, whatever sector-size says.
    public static let sectorSize = 512
    public static let sectorsPerPage = UInt8(pageSize / sectorSize)
    /// PAGE_SIZE / sizeof(struct blkif_request_segment).
    public static let segmentsPerIndirectPage = pageSize / BlkifSegment.byteCount
    /// The most segments indirect pages can describe at all.
    public static let maxIndirectSegments = maxIndirectPagesPerRequest * segmentsPerIndirectPage

    /// ceil(segments / segments-per-page): the indirect pages a request with that many segments uses.
    public static func indirectPages(forSegments segments: Int) -> Int {
        (segments + segmentsPerIndirectPage - 1) / segmentsPerIndirectPage
    }
}

/// The ABI a frontend speaks, from its xenstore `protocol` node.
public enum BlkifProtocol: Sendable, Hashable, CustomStringConvertible {
    /// The host's own layout; what a frontend without a `protocol` node speaks.
    case native
    /// "x86_32-abi": packed 4-byte-aligned 64-bit fields.
    case x86_32
    /// "x86_64-abi": 64-bit fields 8-byte aligned.
    case x86_64

    /// Parses the xenstore `protocol` value; a missing node means native. nil for an unknown
    /// ABI, which is fatal for that device.
    public init?(xenstoreValue value: String?) {
        switch value {
        case nil, "": self = .native  // connect_ring: an unreadable value means the default
        case "x86_32-abi": self = .x86_32
        case "x86_64-abi": self = .x86_64
        default: return nil
        }
    }

    /// The value a frontend writes to xenstore for this ABI (XEN_IO_PROTO_ABI_*).
    public var xenstoreValue: String {
        switch self {
        case .x86_32: "x86_32-abi"
        case .x86_64: "x86_64-abi"
        case .native: BlkifProtocol.hostABI.xenstoreValue
        }
    }

    public var description: String { xenstoreValue }

    /// XEN_IO_PROTO_ABI_NATIVE: 64-bit hosts share the x86_64 layout.
    static var hostABI: BlkifProtocol {
        #if arch(i386) || arch(arm)
        .x86_32
        #else
        .x86_64
        #endif
    }
}

/// BLKIF_OP_*. Values outside the spec are preserved so the backend can answer them
/// with EOPNOTSUPP.
public enum BlkifOperation: Sendable, Hashable {
    case read, write, writeBarrier, flushDiskCache, discard, indirect
    case unknown(UInt8)

    public init(rawValue: UInt8) {
        switch rawValue {
        case 0: self = .read
        case 1: self = .write
        case 2: self = .writeBarrier
        case 3: self = .flushDiskCache
        case 5: self = .discard
        case 6: self = .indirect
        default: self = .unknown(rawValue)
        }
    }

    public var rawValue: UInt8 {
        switch self {
        case .read: 0
        case .write: 1
        case .writeBarrier: 2
        case .flushDiskCache: 3
        case .discard: 5
        case .indirect: 6
        case .unknown(let raw): raw
        }
    }

    /// Whether the operation changes the disk (refused on read-only devices when it carries data).
    public var modifiesDisk: Bool {
        switch self {
        case .write, .writeBarrier, .flushDiskCache, .discard: true
        case .read, .indirect, .unknown: false
        }
    }
}

/// struct blkif_request_segment: one granted 4 KiB frame and the inclusive sector range in it.
public struct BlkifSegment: Sendable, Hashable {
    public static let byteCount = 8

    public var gref: UInt32
    public var firstSect: UInt8
    public var lastSect: UInt8

    public init(gref: UInt32, firstSect: UInt8, lastSect: UInt8) {
        self.gref = gref
        self.firstSect = firstSect
        self.lastSect = lastSect
    }

    /// Sectors transferred; meaningful once validated (lastSect ≥ firstSect).
    public var sectorCount: UInt64 { UInt64(lastSect) &- UInt64(firstSect) &+ 1 }
}

/// A request taken off (or to be put on) the ring.
public enum BlkifRequest: Sendable, Equatable {
    /// READ, WRITE, WRITE_BARRIER and FLUSH_DISKCACHE share struct blkif_request.
    case readWrite(ReadWrite)
    case discard(Discard)
    case indirect(Indirect)
    /// An operation this codec has no layout for; only its id is read so it can be answered.
    case other(operation: BlkifOperation, id: UInt64)

    public struct ReadWrite: Sendable, Equatable {
        public var operation: BlkifOperation
        /// nr_segments as written by the frontend; it may disagree with `segments` until
        /// validated (`segments` holds at most 11).
        public var nrSegments: UInt8
        public var handle: UInt16
        public var id: UInt64
        public var sectorNumber: UInt64
        public var segments: FixedCapacityList<11, BlkifSegment>

        public init(operation: BlkifOperation, handle: UInt16 = 0, id: UInt64, sectorNumber: UInt64,
                    segments: FixedCapacityList<11, BlkifSegment> = []) {
            self.operation = operation
            self.nrSegments = UInt8(segments.count)
            self.handle = handle
            self.id = id
            self.sectorNumber = sectorNumber
            self.segments = segments
        }
    }

    /// struct blkif_request_discard.
    public struct Discard: Sendable, Equatable {
        public var secure: Bool
        public var handle: UInt16
        public var id: UInt64
        public var sectorNumber: UInt64
        public var nrSectors: UInt64

        public init(secure: Bool = false, handle: UInt16 = 0, id: UInt64, sectorNumber: UInt64, nrSectors: UInt64) {
            self.secure = secure
            self.handle = handle
            self.id = id
            self.sectorNumber = sectorNumber
            self.nrSectors = nrSectors
        }
    }

    /// struct blkif_request_indirect: the segments live in granted pages, 512 per page.
    public struct Indirect: Sendable, Equatable {
        public var indirectOperation: BlkifOperation
        public var nrSegments: UInt16
        public var handle: UInt16
        public var id: UInt64
        public var sectorNumber: UInt64
        /// Grants of the pages holding the segments. Decoding reads as many as nrSegments
        /// needs (at most 8); validation requires exactly that many.
        public var indirectGrefs: FixedCapacityList<8, UInt32>

        public init(indirectOperation: BlkifOperation, nrSegments: UInt16, handle: UInt16 = 0, id: UInt64,
                    sectorNumber: UInt64, indirectGrefs: FixedCapacityList<8, UInt32>) {
            self.indirectOperation = indirectOperation
            self.nrSegments = nrSegments
            self.handle = handle
            self.id = id
            self.sectorNumber = sectorNumber
            self.indirectGrefs = indirectGrefs
        }
    }

    public var id: UInt64 {
        switch self {
        case .readWrite(let r): r.id
        case .discard(let r): r.id
        case .indirect(let r): r.id
        case .other(_, let id): id
        }
    }

    /// The ring operation (BLKIF_OP_INDIRECT for indirect requests).
    public var operation: BlkifOperation {
        switch self {
        case .readWrite(let r): r.operation
        case .discard: .discard
        case .indirect: .indirect
        case .other(let operation, _): operation
        }
    }

    /// The operation the response carries: an indirect request is answered with its inner
    /// operation (READ/WRITE), as Linux blkback does; Linux blkfront disables the disk on a
    /// response whose operation is not that one ("response has wrong operation").
    public var responseOperation: BlkifOperation {
        if case .indirect(let r) = self { return r.indirectOperation }
        return operation
    }
}

/// BLKIF_RSP_*. Other values (only a hostile backend sends them) are preserved.
public enum BlkifResponseStatus: Sendable, Hashable {
    case okay, error, notSupported
    case unknown(Int16)

    public init(rawValue: Int16) {
        switch rawValue {
        case 0: self = .okay
        case -1: self = .error
        case -2: self = .notSupported
        default: self = .unknown(rawValue)
        }
    }

    public var rawValue: Int16 {
        switch self {
        case .okay: 0
        case .error: -1
        case .notSupported: -2
        case .unknown(let raw): raw
        }
    }
}

/// struct blkif_response.
public struct BlkifResponse: Sendable, Equatable {
    public var id: UInt64
    public var operation: BlkifOperation
    public var status: BlkifResponseStatus

    public init(id: UInt64, operation: BlkifOperation, status: BlkifResponseStatus) {
        self.id = id
        self.operation = operation
        self.status = status
    }

    /// The answer to `request` with `status`.
    public init(answering request: BlkifRequest, status: BlkifResponseStatus) {
        self.init(id: request.id, operation: request.responseOperation, status: status)
    }
}

/// Up to `capacity` elements stored inline, so a decoded request needs no heap allocation.
public struct FixedCapacityList<let capacity: Int, Element: Sendable & Equatable>: RandomAccessCollection, Sendable {
    private var storage: InlineArray<capacity, Element?>
    public private(set) var count: Int

    public init() {
        storage = InlineArray(repeating: nil)
        count = 0
    }

    public var startIndex: Int { 0 }
    public var endIndex: Int { count }

    public subscript(position: Int) -> Element {
        get {
            precondition(position >= 0 && position < count, "index out of range")
            return storage[position]!
        }
        set {
            precondition(position >= 0 && position < count, "index out of range")
            storage[position] = newValue
        }
    }

    /// Appends; traps past the capacity (callers bound the count first).
    public mutating func append(_ element: Element) {
        precondition(count < capacity, "FixedCapacityList holds at most \(capacity) elements")
        storage[count] = element
        count += 1
    }
}

extension FixedCapacityList: Equatable {
    public static func == (lhs: Self, rhs: Self) -> Bool { lhs.elementsEqual(rhs) }
}

extension FixedCapacityList: ExpressibleByArrayLiteral {
    public init(arrayLiteral elements: Element...) {
        self.init()
        for element in elements { append(element) }
    }
}

extension FixedCapacityList: CustomStringConvertible {
    public var description: String { Array(self).description }
}
