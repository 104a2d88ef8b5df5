@testable import Blkif
import CXenBlkif
import Engine
import Testing

/// The Swift layouts against the installed <xen/io/blkif.h> (native) and the x86_32 ABI
/// numbers of Linux's packed blkif_x86_32_* structs.
@Suite struct RingLayoutTests {
    let native = BlkifProtocol.native.layout

    @Test func constantsMatchHeader() {
        #expect(Blkif.maxSegmentsPerRequest == Int(BLKIF_MAX_SEGMENTS_PER_REQUEST))
        #expect(Blkif.maxIndirectPagesPerRequest == Int(BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST))
        #expect(Blkif.segmentsPerIndirectPage == Blkif.pageSize / MemoryLayout<blkif_request_segment>.size)
        #expect(Blkif.segmentsPerIndirectPage == 512)
        let ops: [(BlkifOperation, Int32)] = [
            (.read, BLKIF_OP_READ), (.write, BLKIF_OP_WRITE), (.writeBarrier, BLKIF_OP_WRITE_BARRIER),
            (.flushDiskCache, BLKIF_OP_FLUSH_DISKCACHE), (.discard, BLKIF_OP_DISCARD), (.indirect, BLKIF_OP_INDIRECT),
        ]
        for (operation, raw) in ops {
            #expect(Int32(operation.rawValue) == raw)
            #expect(BlkifOperation(rawValue: UInt8(raw)) == operation)
        }
        #expect(BlkifOperation(rawValue: UInt8(BLKIF_OP_RESERVED_1)) == .unknown(4))
        #expect(BlkifResponseStatus.okay.rawValue == Int16(BLKIF_RSP_OKAY))
        #expect(BlkifResponseStatus.error.rawValue == Int16(BLKIF_RSP_ERROR))
        #expect(BlkifResponseStatus.notSupported.rawValue == Int16(BLKIF_RSP_EOPNOTSUPP))
    }

    @Test func nativeRequestLayoutMatchesHeader() {
        #expect(native == .x86_64)
        #expect(native.requestSize == MemoryLayout<blkif_request>.size)
        #expect(native.requestSize == MemoryLayout<blkif_c_sring_entry>.size)
        #expect(BlkifLayout.operationOffset == MemoryLayout<blkif_request>.offset(of: \.operation))
        #expect(BlkifLayout.byte1Offset == MemoryLayout<blkif_request>.offset(of: \.nr_segments))
        #expect(BlkifLayout.halfword2Offset == MemoryLayout<blkif_request>.offset(of: \.handle))
        #expect(native.idOffset == MemoryLayout<blkif_request>.offset(of: \.id))
        #expect(native.sectorNumberOffset == MemoryLayout<blkif_request>.offset(of: \.sector_number))
        #expect(native.segmentsOffset == MemoryLayout<blkif_request>.offset(of: \.seg))
        #expect(BlkifSegment.byteCount == MemoryLayout<blkif_request_segment>.size)
        #expect(MemoryLayout<blkif_request_segment>.offset(of: \.gref) == 0)
        #expect(MemoryLayout<blkif_request_segment>.offset(of: \.first_sect) == 4)
        #expect(MemoryLayout<blkif_request_segment>.offset(of: \.last_sect) == 5)
    }

    @Test func nativeDiscardAndIndirectLayoutMatchHeader() {
        #expect(MemoryLayout<blkif_request_discard>.size <= native.requestSize)
        #expect(BlkifLayout.byte1Offset == MemoryLayout<blkif_request_discard>.offset(of: \.flag))
        #expect(BlkifLayout.halfword2Offset == MemoryLayout<blkif_request_discard>.offset(of: \.handle))
        #expect(native.idOffset == MemoryLayout<blkif_request_discard>.offset(of: \.id))
        #expect(native.sectorNumberOffset == MemoryLayout<blkif_request_discard>.offset(of: \.sector_number))
        #expect(native.discardNrSectorsOffset == MemoryLayout<blkif_request_discard>.offset(of: \.nr_sectors))
        #expect(UInt8(BLKIF_DISCARD_SECURE) == BlkifRequest.Discard.secureFlag)

        #expect(MemoryLayout<blkif_request_indirect>.size <= native.requestSize)
        #expect(BlkifLayout.byte1Offset == MemoryLayout<blkif_request_indirect>.offset(of: \.indirect_op))
        #expect(BlkifLayout.halfword2Offset == MemoryLayout<blkif_request_indirect>.offset(of: \.nr_segments))
        #expect(native.idOffset == MemoryLayout<blkif_request_indirect>.offset(of: \.id))
        #expect(native.sectorNumberOffset == MemoryLayout<blkif_request_indirect>.offset(of: \.sector_number))
        #expect(native.indirectHandleOffset == MemoryLayout<blkif_request_indirect>.offset(of: \.handle))
        #expect(native.indirectGrefsOffset == MemoryLayout<blkif_request_indirect>.offset(of: \.indirect_grefs))
    }

    @Test func nativeResponseLayoutMatchesHeader() {
        #expect(native.responseSize == MemoryLayout<blkif_response>.size)
        #expect(BlkifLayout.responseIdOffset == MemoryLayout<blkif_response>.offset(of: \.id))
        #expect(BlkifLayout.responseOperationOffset == MemoryLayout<blkif_response>.offset(of: \.operation))
        #expect(BlkifLayout.responseStatusOffset == MemoryLayout<blkif_response>.offset(of: \.status))
    }

    @Test func ringHeaderMatchesHeader() {
        #expect(SharedRing.requestProducerOffset == MemoryLayout<blkif_c_sring>.offset(of: \.req_prod))
        #expect(SharedRing.requestEventOffset == MemoryLayout<blkif_c_sring>.offset(of: \.req_event))
        #expect(SharedRing.responseProducerOffset == MemoryLayout<blkif_c_sring>.offset(of: \.rsp_prod))
        #expect(SharedRing.responseEventOffset == MemoryLayout<blkif_c_sring>.offset(of: \.rsp_event))
        #expect(BlkifLayout.ringHeaderSize == MemoryLayout<blkif_c_sring>.offset(of: \.ring))
    }

    /// __RING_SIZE evaluated on the C types: fitting entries rounded down to a power of two.
    @Test(arguments: 1...16) func ringEntriesMatchRingSizeMacro(pages: Int) {
        let header = MemoryLayout<blkif_c_sring>.offset(of: \.ring)!
        #expect(native.ringEntries(pages: pages)
            == roundDownToPowerOfTwo((pages * Blkif.pageSize - header) / MemoryLayout<blkif_c_sring_entry>.size))
        // x86_32 entries are 108 bytes: for 7 and 14 pages more of them fit than native ones.
        #expect(BlkifLayout.x86_32.ringEntries(pages: pages)
            == roundDownToPowerOfTwo((pages * Blkif.pageSize - header) / 108))
    }

    private func roundDownToPowerOfTwo(_ value: Int) -> UInt32 {
        var power = 1
        while power * 2 <= value { power *= 2 }
        return UInt32(power)
    }

    @Test func ringEntriesPerPageOrder() {
        let expected: [UInt32] = [32, 64, 128, 256, 512]
        for (order, entries) in expected.enumerated() {
            for layout in [BlkifLayout.x86_64, .x86_32] {
                #expect(layout.ringEntries(pages: 1 << order) == entries)
            }
        }
    }

    /// Linux's blkif_x86_32_request: packed, so the 64-bit fields move 4 bytes earlier.
    @Test func x86_32RequestIsPackedFourBytesEarlier() {
        let layout = BlkifProtocol.x86_32.layout
        #expect(layout.requestSize == 108)
        #expect(layout.responseSize == 12)
        #expect(layout.idOffset == 4)
        #expect(layout.sectorNumberOffset == 12)
        #expect(layout.segmentsOffset == 20)
        #expect(layout.segmentsOffset + Blkif.maxSegmentsPerRequest * BlkifSegment.byteCount == layout.requestSize)
        #expect(layout.discardNrSectorsOffset == 20)
        #expect(layout.indirectHandleOffset == 20)
        #expect(layout.indirectGrefsOffset == 24)
        // indirect_grefs then a u64 pad end at 64.
        #expect(layout.indirectGrefsOffset + 4 * Blkif.maxIndirectPagesPerRequest + 8 == 64)
    }

    @Test func x86_64Layout() {
        let layout = BlkifProtocol.x86_64.layout
        #expect(layout.requestSize == 112)
        #expect(layout.responseSize == 16)
        #expect(layout.idOffset == 8)
        #expect(layout.sectorNumberOffset == 16)
        #expect(layout.segmentsOffset == 24)
        #expect(layout.discardNrSectorsOffset == 24)
        #expect(layout.indirectHandleOffset == 24)
        #expect(layout.indirectGrefsOffset == 28)
    }

    @Test func protocolFromXenstore() {
        #expect(BlkifProtocol(xenstoreValue: nil) == .native)
        #expect(BlkifProtocol(xenstoreValue: "x86_32-abi") == .x86_32)
        #expect(BlkifProtocol(xenstoreValue: "x86_64-abi") == .x86_64)
        #expect(BlkifProtocol(xenstoreValue: "arm-abi") == nil)
        #expect(BlkifProtocol(xenstoreValue: "") == .native)
        #expect(BlkifProtocol(xenstoreValue: "x86_64-abi ") == nil)
        #expect(BlkifProtocol.native.xenstoreValue == "x86_64-abi")
        #expect(BlkifProtocol.x86_32.xenstoreValue == "x86_32-abi")
    }
}
