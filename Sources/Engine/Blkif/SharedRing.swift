// The shared ring of <xen/io/ring.h> over raw memory (granted pages mapped by the backend, or
// pages the simulated frontend owns), with the back and front halves' private indices.
//
// Barriers follow ring.h: xen_wmb → release fence, xen_rmb → acquire fence, xen_mb →
// sequentially consistent fence. Shared indices are read and written with single-access
// (relaxed atomic) operations so the compiler neither tears nor repeats them.

import Synchronization

/// Free-running ring index (RING_IDX); arithmetic wraps at 2^32.
public typealias RingIndex = UInt32

/// The other end broke the ring protocol; stop serving this ring.
public enum BlkifRingError: Error, Sendable, Equatable {
    /// More requests published than the ring holds (RING_REQUEST_PROD_OVERFLOW).
    case requestProducerOverflow(requestProducer: RingIndex, responseProducer: RingIndex, ringSize: UInt32)
    /// More responses published than requests outstanding (stricter than
    /// RING_RESPONSE_PROD_OVERFLOW, which only bounds them by the ring size).
    case responseProducerOverflow(responseProducer: RingIndex, responseConsumer: RingIndex, outstandingRequests: UInt32)
}

/// The shared pages: header then entries. Does not own the memory; whoever mapped it keeps it
/// alive while any ring half uses it. One thread drives each half.
public struct SharedRing: @unchecked Sendable {
    public let memory: UnsafeMutableRawPointer
    public let pageCount: Int
    public let layout: BlkifLayout
    /// RING_SIZE: entries in the ring, a power of two.
    public let size: UInt32

    static let requestProducerOffset = 0
    static let requestEventOffset = 4
    static let responseProducerOffset = 8
    static let responseEventOffset = 12

    /// `memory` spans `pageCount` 4 KiB pages (1...16), 4-byte aligned.
    public init(memory: UnsafeMutableRawPointer, pageCount: Int, protocol abi: BlkifProtocol) {
        precondition(Int(bitPattern: memory) % 4 == 0, "ring memory must be 4-byte aligned")
        self.memory = memory
        self.pageCount = pageCount
        self.layout = abi.layout
        self.size = layout.ringEntries(pages: pageCount)
    }

    public var requestProducer: RingIndex { index(at: SharedRing.requestProducerOffset) }
    public var requestEvent: RingIndex { index(at: SharedRing.requestEventOffset) }
    public var responseProducer: RingIndex { index(at: SharedRing.responseProducerOffset) }
    public var responseEvent: RingIndex { index(at: SharedRing.responseEventOffset) }

    /// SHARED_RING_INIT: done by the frontend before it publishes the ring.
    public func initialize() {
        memory.initializeMemory(as: UInt8.self, repeating: 0, count: BlkifLayout.ringHeaderSize)
        setIndex(1, at: SharedRing.requestEventOffset)
        setIndex(1, at: SharedRing.responseEventOffset)
    }

    func index(at offset: Int) -> RingIndex { loadOnce(memory + offset) }
    func setIndex(_ value: RingIndex, at offset: Int) { storeOnce(value, memory + offset) }

    /// The push half of RING_PUSH_{REQUESTS,RESPONSES}_AND_CHECK_NOTIFY, for either end:
    /// publishes the producer index `new` (entries first, xen_wmb) and tells whether the other
    /// end asked to be notified, i.e. its event index lies within the pushed range (read after
    /// the publish, xen_mb).
    func publish(_ new: RingIndex, producerAt producerOffset: Int, eventAt eventOffset: Int) -> Bool {
        let old = index(at: producerOffset)
        atomicMemoryFence(ordering: .releasing)
        setIndex(new, at: producerOffset)
        atomicMemoryFence(ordering: .sequentiallyConsistent)
        return new &- index(at: eventOffset) < new &- old
    }

    func entry(_ index: RingIndex) -> UnsafeMutableRawPointer {
        memory + BlkifLayout.ringHeaderSize + Int(index & (size - 1)) * layout.requestSize
    }
}

/// The backend half: takes requests, puts responses.
public struct BackRing: Sendable {
    public let shared: SharedRing
    /// req_cons: next request to take.
    public private(set) var requestConsumer: RingIndex
    /// rsp_prod_pvt: responses put but maybe not yet pushed.
    public private(set) var responseProducerPrivate: RingIndex
    /// req_prod as last read and checked; takeRequest() consumes up to it.
    private var requestProducerSeen: RingIndex

    /// BACK_RING_ATTACH at `start` (0 for a fresh ring).
    public init(attaching shared: SharedRing, at start: RingIndex = 0) {
        self.init(resuming: shared, requestConsumer: start, responseProducer: start)
    }

    /// Attaches where an earlier backend left the ring: requests before `requestConsumer`
    /// were taken, responses before `responseProducer` written.
    public init(resuming shared: SharedRing, requestConsumer: RingIndex, responseProducer: RingIndex) {
        self.shared = shared
        self.requestConsumer = requestConsumer
        responseProducerPrivate = responseProducer
        requestProducerSeen = requestConsumer
    }

    /// Whether req_prod moved past the requests taken: one read, for polling; what it found
    /// is validated by `unconsumedRequests`.
    public var hasUnconsumedRequests: Bool {
        shared.index(at: SharedRing.requestProducerOffset) != requestConsumer
    }

    /// Reads req_prod once, rejects an impossible value, and returns how many requests can be
    /// taken now (XEN_RING_NR_UNCONSUMED_REQUESTS: never more than there are free response slots).
    public mutating func unconsumedRequests() throws(BlkifRingError) -> UInt32 {
        let producer = shared.index(at: SharedRing.requestProducerOffset)
        if producer &- responseProducerPrivate > shared.size {
            throw .requestProducerOverflow(requestProducer: producer, responseProducer: responseProducerPrivate,
                                           ringSize: shared.size)
        }
        atomicMemoryFence(ordering: .acquiring)  // xen_rmb: entries are read after req_prod
        requestProducerSeen = producer
        return available
    }

    private var available: UInt32 {
        min(requestProducerSeen &- requestConsumer, shared.size &- (requestConsumer &- responseProducerPrivate))
    }

    /// Copies the next request out of the ring and decodes the copy; nil when the requests
    /// seen by the last unconsumedRequests() / finalCheckForRequests() are all taken.
    /// The result is structurally decoded only: `validate(for:)` it before use.
    public mutating func takeRequest() -> BlkifRequest? {
        guard available > 0 else { return nil }
        let copy = RingEntryCopy(copying: shared.entry(requestConsumer), byteCount: shared.layout.requestSize)
        requestConsumer &+= 1
        return BlkifRequest(copy: copy, layout: shared.layout)
    }

    /// Writes a response into the next response slot (not yet visible: push it).
    public mutating func putResponse(_ response: BlkifResponse) {
        precondition(responseProducerPrivate != requestConsumer, "more responses than requests taken")
        response.encode(into: shared.entry(responseProducerPrivate), layout: shared.layout)
        responseProducerPrivate &+= 1
    }

    /// RING_PUSH_RESPONSES_AND_CHECK_NOTIFY: publishes the responses put so far; true when
    /// the frontend asked to be notified (rsp_event within the pushed range).
    public mutating func pushResponsesAndCheckNotify() -> Bool {
        shared.publish(responseProducerPrivate, producerAt: SharedRing.responseProducerOffset,
                       eventAt: SharedRing.responseEventOffset)
    }

    /// RING_FINAL_CHECK_FOR_REQUESTS: true when requests are waiting; otherwise arms req_event
    /// so the frontend notifies on its next request, and checks once more for a racing one.
    public mutating func finalCheckForRequests() throws(BlkifRingError) -> Bool {
        if try unconsumedRequests() > 0 { return true }
        shared.setIndex(requestConsumer &+ 1, at: SharedRing.requestEventOffset)
        atomicMemoryFence(ordering: .sequentiallyConsistent)  // xen_mb: req_event before re-reading req_prod
        return try unconsumedRequests() > 0
    }
}

/// The frontend half (the simulated guest): puts requests, takes responses.
public struct FrontRing: Sendable {
    public let shared: SharedRing
    /// req_prod_pvt: requests put but maybe not yet pushed.
    public private(set) var requestProducerPrivate: RingIndex
    /// rsp_cons: next response to take.
    public private(set) var responseConsumer: RingIndex
    private var responseProducerSeen: RingIndex

    /// XEN_FRONT_RING_INIT: initializes the shared header and attaches at 0.
    public init(initializing shared: SharedRing) {
        shared.initialize()
        self.init(attaching: shared)
    }

    /// FRONT_RING_ATTACH at `start`, leaving the shared header as it is.
    public init(attaching shared: SharedRing, at start: RingIndex = 0) {
        self.shared = shared
        requestProducerPrivate = start
        responseConsumer = start
        responseProducerSeen = start
    }

    /// RING_FREE_REQUESTS.
    public var freeRequestSlots: UInt32 {
        shared.size &- (requestProducerPrivate &- responseConsumer)
    }

    /// Writes a request into the next free slot (not yet visible: push it). False when the
    /// ring is full.
    public mutating func putRequest(_ request: BlkifRequest) -> Bool {
        guard freeRequestSlots > 0 else { return false }
        request.encode(into: shared.entry(requestProducerPrivate), layout: shared.layout)
        requestProducerPrivate &+= 1
        return true
    }

    /// RING_PUSH_REQUESTS_AND_CHECK_NOTIFY: publishes the requests put so far; true when the
    /// backend asked to be notified.
    public mutating func pushRequestsAndCheckNotify() -> Bool {
        shared.publish(requestProducerPrivate, producerAt: SharedRing.requestProducerOffset,
                       eventAt: SharedRing.requestEventOffset)
    }

    /// Reads rsp_prod once, rejects an impossible value, returns the responses ready.
    public mutating func unconsumedResponses() throws(BlkifRingError) -> UInt32 {
        let producer = shared.index(at: SharedRing.responseProducerOffset)
        let outstanding = requestProducerPrivate &- responseConsumer
        if producer &- responseConsumer > outstanding {
            throw .responseProducerOverflow(responseProducer: producer, responseConsumer: responseConsumer,
                                            outstandingRequests: outstanding)
        }
        atomicMemoryFence(ordering: .acquiring)  // xen_rmb: entries are read after rsp_prod
        responseProducerSeen = producer
        return producer &- responseConsumer
    }

    /// Copies the next response out of the ring; nil when those seen are all taken.
    public mutating func takeResponse() -> BlkifResponse? {
        guard responseProducerSeen != responseConsumer else { return nil }
        let copy = RingEntryCopy(copying: shared.entry(responseConsumer), byteCount: shared.layout.responseSize)
        responseConsumer &+= 1
        return BlkifResponse(copy: copy)
    }

    /// RING_FINAL_CHECK_FOR_RESPONSES: true when responses are waiting; otherwise arms
    /// rsp_event and checks once more.
    public mutating func finalCheckForResponses() throws(BlkifRingError) -> Bool {
        if try unconsumedResponses() > 0 { return true }
        shared.setIndex(responseConsumer &+ 1, at: SharedRing.responseEventOffset)
        atomicMemoryFence(ordering: .sequentiallyConsistent)  // xen_mb: rsp_event before re-reading rsp_prod
        return try unconsumedResponses() > 0
    }
}
