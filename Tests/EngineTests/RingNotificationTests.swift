@testable import Blkif
import Engine
import Foundation
import Testing

/// Event suppression (req_event / rsp_event) and index checks of the two ring halves.
@Suite struct RingNotificationTests {
    static let flush = BlkifRequest.readWrite(.init(operation: .flushDiskCache, id: 1, sectorNumber: 0))

    @Test func requestNotificationFollowsRequestEvent() throws {
        var pair = RingPair()
        #expect(pair.shared.requestEvent == 1)
        _ = pair.front.putRequest(Self.flush)
        var notify = pair.front.pushRequestsAndCheckNotify()
        #expect(notify, "req_event 1 lies in the first push")
        _ = pair.front.putRequest(Self.flush)
        notify = pair.front.pushRequestsAndCheckNotify()
        #expect(!notify, "the backend has not re-armed req_event")
        notify = pair.front.pushRequestsAndCheckNotify()
        #expect(!notify, "nothing new pushed")

        #expect(try pair.back.unconsumedRequests() == 2)
        #expect(pair.back.takeRequest() != nil)
        var pending = try pair.back.finalCheckForRequests()
        #expect(pending, "one request still waits")
        #expect(pair.shared.requestEvent == 1, "not re-armed while work remains")
        #expect(pair.back.takeRequest() != nil)
        #expect(pair.back.takeRequest() == nil)
        pending = try pair.back.finalCheckForRequests()
        #expect(!pending)
        #expect(pair.shared.requestEvent == 3, "armed for the next request")

        _ = pair.front.putRequest(Self.flush)
        notify = pair.front.pushRequestsAndCheckNotify()
        #expect(notify)
    }

    /// A backend that batches sets req_event further ahead; the frontend notifies only when
    /// its push reaches it.
    @Test func batchedRequestEvent() {
        var pair = RingPair()
        pair.shared.setIndex(3, at: SharedRing.requestEventOffset)
        for expected in [false, false, true, false] {
            _ = pair.front.putRequest(Self.flush)
            let notify = pair.front.pushRequestsAndCheckNotify()
            #expect(notify == expected)
        }
        // Several requests in one push notify when the event index lies anywhere in them.
        pair.shared.setIndex(6, at: SharedRing.requestEventOffset)
        for _ in 0..<3 { _ = pair.front.putRequest(Self.flush) }
        let notify = pair.front.pushRequestsAndCheckNotify()
        #expect(notify)
    }

    @Test func responseNotificationFollowsResponseEvent() throws {
        var pair = RingPair()
        for _ in 0..<3 { _ = try pair.send(Self.flush) }
        #expect(pair.shared.responseEvent == 1)
        pair.back.putResponse(BlkifResponse(answering: Self.flush, status: .okay))
        var notify = pair.back.pushResponsesAndCheckNotify()
        #expect(notify)
        pair.back.putResponse(BlkifResponse(answering: Self.flush, status: .okay))
        notify = pair.back.pushResponsesAndCheckNotify()
        #expect(!notify, "the frontend has not re-armed rsp_event")

        #expect(try pair.front.unconsumedResponses() == 2)
        #expect(pair.front.takeResponse() != nil)
        var pending = try pair.front.finalCheckForResponses()
        #expect(pending)
        #expect(pair.front.takeResponse() != nil)
        #expect(pair.front.takeResponse() == nil)
        pending = try pair.front.finalCheckForResponses()
        #expect(!pending)
        #expect(pair.shared.responseEvent == 3)

        pair.back.putResponse(BlkifResponse(answering: Self.flush, status: .okay))
        notify = pair.back.pushResponsesAndCheckNotify()
        #expect(notify)
    }

    /// Free-running indices cross 2^32 without losing entries or notifications.
    @Test(arguments: allProtocols)
    func indicesWrapAround(abi: BlkifProtocol) throws {
        let memory = RingMemory(pages: 1)
        let shared = SharedRing(memory: memory.pointer, pageCount: 1, protocol: abi)
        let start = RingIndex.max - 2
        shared.initialize()
        for offset in [SharedRing.requestProducerOffset, SharedRing.responseProducerOffset] {
            shared.setIndex(start, at: offset)
        }
        shared.setIndex(start &+ 1, at: SharedRing.requestEventOffset)
        shared.setIndex(start &+ 1, at: SharedRing.responseEventOffset)
        var front = FrontRing(attaching: shared, at: start)
        var back = BackRing(attaching: shared, at: start)

        for id in UInt64(0)..<6 {
            let request = BlkifRequest.discard(.init(id: id, sectorNumber: id, nrSectors: 1))
            _ = front.putRequest(request)
            let notifyBack = front.pushRequestsAndCheckNotify()
            #expect(notifyBack)
            #expect(try back.unconsumedRequests() == 1)
            #expect(back.takeRequest() == request)
            #expect(try !back.finalCheckForRequests())
            back.putResponse(BlkifResponse(answering: request, status: .okay))
            let notifyFront = back.pushResponsesAndCheckNotify()
            #expect(notifyFront)
            #expect(try front.unconsumedResponses() == 1)
            #expect(front.takeResponse()?.id == id)
            #expect(try !front.finalCheckForResponses())
        }
        #expect(back.requestConsumer == start &+ 6)
        #expect(front.responseConsumer == 3)
    }

    @Test func fullRingRefusesRequests() throws {
        var pair = RingPair()
        for _ in 0..<32 {
            let put = pair.front.putRequest(Self.flush)
            #expect(put)
        }
        #expect(pair.front.freeRequestSlots == 0)
        var put = pair.front.putRequest(Self.flush)
        #expect(!put)
        _ = pair.front.pushRequestsAndCheckNotify()
        #expect(try pair.back.unconsumedRequests() == 32)
        for _ in 0..<32 { #expect(pair.back.takeRequest() != nil) }
        #expect(pair.back.takeRequest() == nil)
        // Still full until responses are consumed.
        put = pair.front.putRequest(Self.flush)
        #expect(!put)
        pair.back.putResponse(BlkifResponse(answering: Self.flush, status: .okay))
        _ = pair.back.pushResponsesAndCheckNotify()
        _ = try pair.front.unconsumedResponses()
        _ = pair.front.takeResponse()
        #expect(pair.front.freeRequestSlots == 1)
    }

    @Test func takeRequestNeedsAFreshLook() {
        var pair = RingPair()
        _ = pair.front.putRequest(Self.flush)
        _ = pair.front.pushRequestsAndCheckNotify()
        #expect(pair.back.takeRequest() == nil, "req_prod not read yet")
    }

    /// RING_REQUEST_PROD_OVERFLOW: a req_prod more than a ring ahead of the responses
    /// stops the ring.
    @Test(arguments: [RingIndex(33), 34, 0x8000_0000, RingIndex.max])
    func requestProducerOverflow(requestProducer: RingIndex) throws {
        var pair = RingPair()
        pair.shared.setIndex(requestProducer, at: SharedRing.requestProducerOffset)
        #expect(throws: BlkifRingError.requestProducerOverflow(requestProducer: requestProducer, responseProducer: 0,
                                                              ringSize: 32)) {
            _ = try pair.back.unconsumedRequests()
        }
        #expect(throws: BlkifRingError.self) { _ = try pair.back.finalCheckForRequests() }
        #expect(pair.back.takeRequest() == nil)
    }

    /// Requests the backend has taken but not answered count against the ring.
    @Test func overflowCountsUnansweredRequests() throws {
        var pair = RingPair()
        for _ in 0..<32 { _ = pair.front.putRequest(Self.flush) }
        _ = pair.front.pushRequestsAndCheckNotify()
        _ = try pair.back.unconsumedRequests()
        while pair.back.takeRequest() != nil {}
        pair.shared.setIndex(33, at: SharedRing.requestProducerOffset)
        #expect(throws: BlkifRingError.self) { _ = try pair.back.unconsumedRequests() }

        pair.back.putResponse(BlkifResponse(answering: Self.flush, status: .okay))
        // One slot answered: 33 is now legal and exactly one more request may be taken.
        #expect(try pair.back.unconsumedRequests() == 1)
    }

    /// A req_prod within bounds but ahead of free response slots is capped
    /// (XEN_RING_NR_UNCONSUMED_REQUESTS).
    @Test func unconsumedIsCappedByResponseSlots() throws {
        var pair = RingPair()
        for _ in 0..<32 { _ = pair.front.putRequest(Self.flush) }
        _ = pair.front.pushRequestsAndCheckNotify()
        _ = try pair.back.unconsumedRequests()
        for _ in 0..<20 { _ = pair.back.takeRequest() }
        for _ in 0..<4 { pair.back.putResponse(BlkifResponse(answering: Self.flush, status: .okay)) }
        pair.shared.setIndex(36, at: SharedRing.requestProducerOffset)
        #expect(try pair.back.unconsumedRequests() == 16)
    }

    @Test func responseProducerOverflow() throws {
        var pair = RingPair()
        _ = try pair.send(Self.flush)
        pair.shared.setIndex(2, at: SharedRing.responseProducerOffset)
        #expect(throws: BlkifRingError.responseProducerOverflow(responseProducer: 2, responseConsumer: 0,
                                                               outstandingRequests: 1)) {
            _ = try pair.front.unconsumedResponses()
        }
        #expect(pair.front.takeResponse() == nil)
    }

    /// Frontend and backend on separate threads over the same memory: every request arrives
    /// intact and every response comes back in order.
    @Test(arguments: [BlkifProtocol.native, .x86_32])
    func concurrentEnds(abi: BlkifProtocol) throws {
        let total: UInt64 = 100_000
        let memory = RingMemory(pages: 1)
        let shared = SharedRing(memory: memory.pointer, pageCount: 1, protocol: abi)
        var front = FrontRing(initializing: shared)
        let backendDone = DispatchSemaphore(value: 0)
        let backend = Thread {
            var back = BackRing(attaching: shared)
            var served: UInt64 = 0
            while served < total {
                guard let pending = try? back.finalCheckForRequests() else { break }
                if !pending { sched_yield(); continue }
                while let request = back.takeRequest() {
                    let intact = if case .readWrite(let rw) = request {
                        rw.sectorNumber == request.id &* 3 && rw.segments.first?.gref == UInt32(truncatingIfNeeded: request.id)
                    } else { false }
                    back.putResponse(BlkifResponse(answering: request, status: intact ? .okay : .error))
                    served += 1
                }
                _ = back.pushResponsesAndCheckNotify()
            }
            backendDone.signal()
        }
        backend.start()

        var nextID: UInt64 = 0
        var answered: UInt64 = 0
        var failures = 0
        while answered < total {
            while nextID < total && front.freeRequestSlots > 0 {
                _ = front.putRequest(.readWrite(.init(operation: .read, id: nextID, sectorNumber: nextID &* 3, segments: segments([
                    .init(gref: UInt32(truncatingIfNeeded: nextID), firstSect: 0, lastSect: 7),
                ]))))
                nextID += 1
            }
            _ = front.pushRequestsAndCheckNotify()
            guard try front.finalCheckForResponses() else { sched_yield(); continue }
            while let response = front.takeResponse() {
                if response != BlkifResponse(id: answered, operation: .read, status: .okay) { failures += 1 }
                answered += 1
            }
        }
        backendDone.wait()
        #expect(failures == 0)
        #expect(answered == total)
    }
}
