@testable import Blkif
import Engine
import Testing

/// Page-aligned memory standing in for a granted ring (or indirect) page set.
final class RingMemory {
    let pointer: UnsafeMutableRawPointer
    let byteCount: Int

    init(pages: Int, filling byte: UInt8 = 0) {
        byteCount = pages * Blkif.pageSize
        pointer = UnsafeMutableRawPointer.allocate(byteCount: byteCount, alignment: Blkif.pageSize)
        pointer.initializeMemory(as: UInt8.self, repeating: byte, count: byteCount)
    }

    deinit { pointer.deallocate() }

    func bytes(at offset: Int, count: Int) -> [UInt8] {
        Array(UnsafeRawBufferPointer(start: pointer + offset, count: count))
    }
}

/// A frontend and a backend attached to the same fresh ring.
struct RingPair {
    let memory: RingMemory
    var front: FrontRing
    var back: BackRing

    init(protocol abi: BlkifProtocol = .native, pages: Int = 1) {
        memory = RingMemory(pages: pages, filling: 0xAA)
        let shared = SharedRing(memory: memory.pointer, pageCount: pages, protocol: abi)
        front = FrontRing(initializing: shared)
        back = BackRing(attaching: shared)
    }

    var shared: SharedRing { back.shared }

    /// Frontend puts and pushes one request; the backend takes it.
    mutating func send(_ request: BlkifRequest) throws -> BlkifRequest? {
        let put = front.putRequest(request)
        #expect(put)
        _ = front.pushRequestsAndCheckNotify()
        let waiting = try back.unconsumedRequests()
        #expect(waiting == 1)
        return back.takeRequest()
    }

    /// Backend puts and pushes one response; the frontend takes it.
    mutating func answer(_ response: BlkifResponse) throws -> BlkifResponse? {
        back.putResponse(response)
        _ = back.pushResponsesAndCheckNotify()
        let waiting = try front.unconsumedResponses()
        #expect(waiting == 1)
        return front.takeResponse()
    }
}

let allProtocols: [BlkifProtocol] = [.native, .x86_32, .x86_64]

func segments(_ list: [BlkifSegment]) -> FixedCapacityList<11, BlkifSegment> {
    var result = FixedCapacityList<11, BlkifSegment>()
    for segment in list { result.append(segment) }
    return result
}
