// Byte layouts of the blkif ring entries per ABI. The x86_64 (and native 64-bit) layout is the
// one in <xen/io/blkif.h>; the x86_32 one is the same structs packed to 4-byte alignment, so
// every field from `id` on sits 4 bytes earlier. Fields before `id` share offsets:
// operation 0; nr_segments / discard flag / indirect_op 1; handle (read/write, discard) 2;
// indirect nr_segments 2.

/// Where the fields of requests and responses sit for one ABI.
public struct BlkifLayout: Sendable, Equatable {
    /// sizeof(struct blkif_request), which is also the ring entry (union) size.
    public let requestSize: Int
    public let responseSize: Int
    public let idOffset: Int
    public let sectorNumberOffset: Int
    /// seg[0] of a read/write request.
    public let segmentsOffset: Int
    /// nr_sectors of a discard request.
    public let discardNrSectorsOffset: Int
    /// handle of an indirect request (it moved behind sector_number there).
    public let indirectHandleOffset: Int
    public let indirectGrefsOffset: Int

    static let operationOffset = 0
    /// nr_segments (read/write), flag (discard), indirect_op (indirect).
    static let byte1Offset = 1
    /// handle (read/write, discard), nr_segments (indirect).
    static let halfword2Offset = 2
    static let responseIdOffset = 0
    static let responseOperationOffset = 8
    static let responseStatusOffset = 10

    public static let x86_64 = BlkifLayout(
        requestSize: 112, responseSize: 16, idOffset: 8, sectorNumberOffset: 16, segmentsOffset: 24,
        discardNrSectorsOffset: 24, indirectHandleOffset: 24, indirectGrefsOffset: 28)

    public static let x86_32 = BlkifLayout(
        requestSize: 108, responseSize: 12, idOffset: 4, sectorNumberOffset: 12, segmentsOffset: 20,
        discardNrSectorsOffset: 20, indirectHandleOffset: 20, indirectGrefsOffset: 24)

    /// Ring page header: req_prod, req_event, rsp_prod, rsp_event, then padding to 64 bytes.
    public static let ringHeaderSize = 64
    /// ring-page-order is at most 4 in practice (Linux's max-ring-page-order); 16 pages.
    public static let maxRingPages = 16

    /// __RING_SIZE: entries that fit after the header, rounded down to a power of two so
    /// indices can be masked.
    public func ringEntries(pages: Int) -> UInt32 {
        precondition(pages >= 1 && pages <= BlkifLayout.maxRingPages, "ring of \(pages) pages")
        let fitting = UInt32((pages * Blkif.pageSize - BlkifLayout.ringHeaderSize) / requestSize)
        return 1 << (31 - UInt32(fitting.leadingZeroBitCount))
    }
}

extension BlkifProtocol {
    public var layout: BlkifLayout {
        switch self {
        case .x86_32: .x86_32
        case .x86_64: .x86_64
        case .native: BlkifProtocol.hostABI.layout
        }
    }
}
