import Blkif
internal import CURing
import Dispatch
import Foundation
import Glibc
import Hypervisor
import Logging
import RBD
import Synchronization
import VBDInterface

/// Where a VBD's rings send their I/O.
enum StoreAccess: Sendable {
    /// io_uring on the store's descriptor (O_DIRECT when the store allows it; owned by
    /// ConnectedVBD); discards punch holes, or BLKDISCARD on a block device.
    case local(descriptor: Int32, isBlockDevice: Bool)
    /// An NBD export, one connection per ring.
    case nbd(NBDTarget)
    /// An RBD image, open once for all rings of the VBD.
    case rbd(RBDImage)
}

/// What every ring of one VBD shares: where its I/O goes, the limits requests are checked
/// against and the operations served.
struct DeviceContext: Sendable {
    let domid: UInt32
    let access: StoreAccess
    /// Everything a request is validated against but the size, which `capacity` holds.
    let fixedLimits: BlkifRequestLimits
    /// The device's size in sectors, changed by an online resize.
    let capacity: DeviceCapacity
    var limits: BlkifRequestLimits {
        var limits = fixedLimits
        limits.sectors = capacity.sectors
        return limits
    }
    let features: BlockFeatures
    /// The grant refs of every ring page of the device: never accepted as data.
    let ringRefs: Set<UInt32>
    /// feature-persistent agreed, and the persistent grants each ring may keep mapped.
    let persistentGrants: Bool
    let maxPersistentGrants: Int
    /// Pages not kept mapped travel by grant copy through daemon memory (direct-copy).
    let copyTransient: Bool
    /// The longest a ring worker polls before it sleeps (AdaptivePollWindow; 0: never).
    let maxPollNanoseconds: UInt64
    /// The guest's grant cap, shared with its other VBDs.
    let grantBudget: DomainGrantBudget
    /// The VBD's QoS limits, shared by its rings.
    let throttle: QoSThrottle
    /// Halts and error responses, for the API's event stream.
    let events: VBDEventReporter
}

/// One request between being taken off the ring and being answered (blkback's pending_req).
/// Slots are preallocated, one per ring entry, so in-flight requests never exceed the ring.
private final class RequestSlot {
    enum Stage { case idle, waitingForDrain, data, flush, discard }

    var stage = Stage.idle
    var id: UInt64 = 0
    /// Echoed in the response: the ring operation, the inner one for indirect requests.
    var operation = BlkifOperation.read
    /// nil for operations without a latency histogram (unknown ones).
    var kind: BlockOperationKind?
    var status = BlkifResponseStatus.okay
    /// When QoS started holding the request back (0: it was not held).
    var heldSince: UInt64 = 0
    /// Where the journal keeps the request until its answer is public.
    var journalSlot = 0
    /// The data segments (copied off the ring or out of the indirect pages) and their pages.
    var segments: [BlkifSegment] = []
    let data = RequestGrants(capacity: Blkif.maxSegmentsPerRequest, copyable: true)
    let indirect = RequestGrants(capacity: Blkif.maxIndirectPagesPerRequest, copyable: false)
    var isWrite = false
    var offset: UInt64 = 0
    var bytes: UInt64 = 0
    var transferred: UInt64 = 0
    var flushAfter = false
    var discardLength: UInt64 = 0
    /// BLKIF_DISCARD_SECURE: BLKSECDISCARD instead of BLKDISCARD.
    var secureDiscard = false
    /// Submissions not yet completed.
    var outstanding = 0
    var started: UInt64 = 0
    var vectors: UnsafeMutablePointer<iovec>
    var vectorCapacity: Int
    var vectorCount = 0
    /// Page-aligned daemon memory for the pages copied rather than mapped (O_DIRECT needs the
    /// alignment); page i of the request is page i here. Up to 11 pages stay with the slot;
    /// more go back to the ring's pool when the request is answered.
    private var bounce: UnsafeMutableRawPointer?
    private var bouncePages = 0
    private let pool: BouncePool

    init(pool: BouncePool) {
        self.pool = pool
        vectorCapacity = Blkif.maxSegmentsPerRequest
        vectors = .allocate(capacity: vectorCapacity)
        segments.reserveCapacity(Blkif.maxSegmentsPerRequest)
    }

    deinit {
        vectors.deallocate()
        if let bounce { pool.give(bounce, pages: bouncePages) }
    }

    /// Page `index` of the bounce memory, grown to `pages` pages.
    func bouncePage(_ index: Int, of pages: Int) -> UnsafeMutableRawPointer {
        if pages > bouncePages {
            if let bounce { pool.give(bounce, pages: bouncePages) }
            (bounce, bouncePages) = pool.take(atLeast: pages)
        }
        return bounce! + index * Blkif.pageSize
    }

    /// Gives back bounce memory beyond what a direct request needs.
    func trimBounce() {
        guard let bounce, bouncePages > Blkif.maxSegmentsPerRequest else { return }
        pool.give(bounce, pages: bouncePages)
        self.bounce = nil
        bouncePages = 0
    }

    /// The GNTTABOP_copy segments of the request's copied pages: the sectors each segment uses.
    func copySegments(into list: inout [GrantCopySegment]) {
        for index in data.copied {
            let segment = segments[index]
            let offset = Int(segment.firstSect) * Blkif.sectorSize
            list.append(GrantCopySegment(ref: data.refs[index], offset: UInt16(offset),
                                         length: UInt16(Int(segment.sectorCount) * Blkif.sectorSize),
                                         local: data.page(index) + offset))
        }
    }

    func reserveVectors(_ count: Int) {
        guard count > vectorCapacity else { return }
        vectors.deallocate()
        vectors = .allocate(capacity: count)
        vectorCapacity = count
    }
}

/// Bounce memory of large requests, kept for the next ones: allocating and freeing a
/// megabyte per 1M request cost a page fault per page and an munmap each time (a third of
/// an NBD ring's time in 1M reads). At most `limitPages` (32 MiB) are kept per ring.
final class BouncePool {
    static let limitPages = 8192
    private var spare: [(memory: UnsafeMutableRawPointer, pages: Int)] = []
    private var keptPages = 0

    deinit { for buffer in spare { buffer.memory.deallocate() } }

    /// Memory of at least `pages` pages: a kept buffer, else a new one.
    func take(atLeast pages: Int) -> (UnsafeMutableRawPointer, Int) {
        if let index = spare.firstIndex(where: { $0.pages >= pages }) {
            let buffer = spare.remove(at: index)
            keptPages -= buffer.pages
            return (buffer.memory, buffer.pages)
        }
        return (.allocate(byteCount: pages * Blkif.pageSize, alignment: Blkif.pageSize), pages)
    }

    func give(_ memory: UnsafeMutableRawPointer, pages: Int) {
        guard pages > Blkif.maxSegmentsPerRequest, keptPages + pages <= Self.limitPages else { return memory.deallocate() }
        spare.append((memory, pages))
        keptPages += pages
    }
}

/// Serves one shared ring on its own thread (blkback's xen_blkif_schedule): sleeps in its
/// io_uring, where I/O completions, its event channel and a wakeup eventfd all arrive; takes
/// requests with the final-check rule, maps the grants of each batch taken together, submits
/// them to io_uring and answers them as they complete.
final class RingWorker: @unchecked Sendable {
    /// Requests taken per pass before completions are looked at again (XSA-332: an event
    /// storm or a full ring cannot monopolise the thread).
    static let requestBudget = 32
    /// Linux's UIO_MAXIOV: iovecs per readv/writev.
    static let maxVectorsPerSubmission = 1024
    /// Pages copied to the guest between two looks at a network store's socket.
    static let copyChunkSegments = 64

    let queue: Int
    let localPort: UInt32
    let statistics = RingStatistics()
    private let eventChannels: any EventChannels
    private let grants: RingGrants
    private let journal: RingJournal
    /// What a predecessor left unanswered, served before anything new.
    private var recovery: RingJournal.Recovery?
    private let ringMapping: GrantMapping
    private let device: DeviceContext
    private var ring: BackRing
    private let uring: IOURing
    /// This ring's client of a network store (NBD, RBD); nil for a local one.
    private let store: (any NetworkStoreClient)?
    private let wakeup: Int32
    private var logger: Logger

    // Shared with the control-plane thread.
    private let stopRequested = Atomic<Bool>(false)
    private let inflightCount = Atomic<Int>(0)
    private let exited = Atomic<Bool>(false)
    private let exitSignal = DispatchSemaphore(value: 0)
    private var started = false

    // Worker-thread state.
    private var slots: [RequestSlot]
    private var freeSlots: [Int]
    /// The barrier waiting for earlier requests to finish; nothing new is taken meanwhile.
    private var heldBarrier: Int?
    private var moreToDo = true
    /// The event channel's watch fired: pending ports to take.
    private var eventsFired = true
    /// io_uring refused submissions for want of resources; retry shortly.
    private var submissionBlocked = false
    private var responsesQueued = false
    private var halted = false
    /// Requests of the current batch whose grants are mapped together at its end.
    private var awaitingGrants: [Int] = []
    /// Requests QoS holds back, in the order taken; nothing new is taken meanwhile.
    private var throttled: [Int] = []
    /// When the head of `throttled` may be admitted.
    private var throttledUntil: UInt64 = 0
    /// READs whose data is in bounce memory, copied to the guest together before answering.
    private var awaitingCopyOut: [Int] = []
    private var copySegments: [GrantCopySegment] = []
    private var lastWarning: UInt64 = 0
    /// Frontend notifications in a row that found no request, and when the masked port is
    /// due to be unmasked again (XSA-332).
    private var spuriousNotifications = 0
    private var unmaskAt: UInt64?
    private var lastErrorEvent: UInt64 = 0
    private var errorsSinceEvent: UInt64 = 0
    private var publishedPersistentGrants: UInt64 = 0
    private var pollWindow: AdaptivePollWindow

    /// Takes ownership of `eventChannels` (bound to `localPort`) and `ringMapping`; releases
    /// them in `release()` once the thread has stopped. With `recovery`, the ring resumes
    /// where a predecessor's journal says it left it.
    init(queue: Int, localPort: UInt32, eventChannels: any EventChannels, grants: any GrantMapper,
         ringMapping: GrantMapping, shared: SharedRing, journal: RingJournal, recovery: RingJournal.Recovery?,
         device: DeviceContext, logger: Logger) throws {
        let chunksPerRequest = max(1, (max(device.limits.maxIndirectSegments, Blkif.maxSegmentsPerRequest)
                                       + Self.maxVectorsPerSubmission - 1) / Self.maxVectorsPerSubmission)
        // Every slot's submissions fit at once, so the completion queue never overflows.
        uring = try IOURing(entries: shared.size * UInt32(chunksPerRequest))
        let descriptor = eventfd(0, Int32(EFD_NONBLOCK | EFD_CLOEXEC))
        guard descriptor >= 0 else { throw SystemCallError(operation: "eventfd") }
        wakeup = descriptor
        self.queue = queue
        self.localPort = localPort
        self.eventChannels = eventChannels
        self.grants = RingGrants(mapper: grants, domain: device.domid, budget: device.grantBudget, ringRefs: device.ringRefs,
                                 persistent: device.persistentGrants, capacity: device.maxPersistentGrants,
                                 copyTransient: device.copyTransient)
        self.ringMapping = ringMapping
        self.device = device
        pollWindow = AdaptivePollWindow(maximum: device.maxPollNanoseconds)
        ring = recovery.map {
            BackRing(resuming: shared, requestConsumer: $0.requestConsumer, responseProducer: $0.responseProducer)
        } ?? BackRing(attaching: shared)
        self.journal = journal
        self.recovery = recovery
        let pool = BouncePool()
        slots = (0..<Int(shared.size)).map { _ in RequestSlot(pool: pool) }
        freeSlots = Array((0..<Int(shared.size)).reversed())
        self.logger = logger
        self.logger[metadataKey: "queue"] = "\(queue)"
        switch device.access {
        case .local: store = nil
        case .nbd(let target):
            store = NBDRingClient(target: target, name: "blkback.\(device.domid)-\(queue)", statistics: statistics, logger: self.logger)
        case .rbd(let image):
            store = RBDRingClient(image: image, wakeup: descriptor, statistics: statistics, logger: self.logger)
        }
    }

    deinit { close(wakeup) }

    var inflight: Int { inflightCount.load(ordering: .acquiring) }
    var hasExited: Bool { exited.load(ordering: .acquiring) }

    func start(name: String) {
        started = true
        let thread = Thread { [self] in
            nameCurrentThread(name)
            run()
            exited.store(true, ordering: .releasing)
            exitSignal.signal()
        }
        thread.start()
    }

    /// Stop taking requests; the thread exits once the ones in flight are answered.
    func requestStop() {
        stopRequested.store(true, ordering: .releasing)
        var one: UInt64 = 1
        _ = write(wakeup, &one, 8)
    }

    /// True once the thread has exited (waiting at most `milliseconds` for it).
    func waitForExit(milliseconds: Int) -> Bool {
        hasExited || exitSignal.wait(timeout: .now() + .milliseconds(milliseconds)) == .success
    }

    /// Once the thread exited (waits for it) or never started: unmap the persistent grants,
    /// unbind the event channel, unmap the ring; remove the journal unless a successor is to
    /// take the ring over.
    func release(keepingJournal: Bool = false) {
        if started && !hasExited { exitSignal.wait() }
        if !keepingJournal { journal.remove() }
        for failure in grants.releaseAll() { logger.warning("unmapping persistent grants: \(failure)") }
        do { try eventChannels.unbind(localPort) } catch { logger.debug("unbinding port \(localPort): \(error)") }
        do { try ringMapping.unmap() } catch { logger.warning("unmapping the ring: \(error)") }
    }

    // MARK: event loop

    private func run() {
        do {
            try uring.watch(eventChannels.fileDescriptor, tag: Self.eventChannelTag)
            try uring.watch(wakeup, tag: Self.wakeupTag)
        } catch {
            logger.critical("cannot wait on the event channel: \(error); ring stopped")
            halt("cannot wait on the event channel: \(error)")
        }
        if let recovery {
            resume(recovery)
            self.recovery = nil
        }
        while true {
            let stopping = stopRequested.load(ordering: .acquiring)
            if stopping && inflight == 0 { break }
            let canTake = !stopping && !halted && heldBarrier == nil && throttled.isEmpty
            // More to take: only collect what finished. Persistent grants wake an idle ring
            // once a second, so unused ones are released after 60 s.
            let busy = canTake && moreToDo
            var timeout: Int? = submissionBlocked ? 1 : !throttled.isEmpty ? qosWaitMilliseconds()
                : (grants.persistentCount > 0 ? 1000 : nil)
            if let unmaskAt {
                let wait = max(1, Int((unmaskAt &- min(unmaskAt, DispatchTime.now().uptimeNanoseconds) + 999_999) / 1_000_000))
                timeout = min(timeout ?? wait, wait)
            }
            if let wait = store?.prepareToWait(uring, cancellationTag: Self.withdrawnTag) { timeout = min(timeout ?? wait, wait) }
            let idleSince = busy ? nil : DispatchTime.now().uptimeNanoseconds
            let sleep = !busy && !pollForWork(canTake: canTake) && !(canTake && requestsAfterArming())
            do {
                try uring.submitAndWait(minimum: sleep ? 1 : 0, milliseconds: timeout)
                if let idleSince { pollWindow.record(waited: DispatchTime.now().uptimeNanoseconds &- idleSince) }
                submissionBlocked = false
            } catch let error as SystemCallError where error.errno == EAGAIN || error.errno == EBUSY {
                statistics.update { $0.outOfResources += 1 }
                submissionBlocked = true
            } catch {
                logger.critical("io_uring failed: \(error); ring stopped")
                halt("io_uring failed: \(error)")
                // What the kernel never took is answered now (an error), or in-flight would
                // never drain and the disconnect would wait forever.
                for tag in uring.withdrawUnsubmitted(replacingTagsWith: Self.withdrawnTag) {
                    completed(IOURing.Completion(tag: tag, result: -ECANCELED, more: false))
                }
                pushResponses()
                if inflight == 0 { break }
                usleep(1000)
            }
            reapCompletions()
            admitThrottled()
            unmaskIfDue()
            let notified = eventsFired && takeEvents()
            // Answers go out before new requests are queued.
            pushResponses()
            let couldTake = !stopRequested.load(ordering: .acquiring) && !halted && heldBarrier == nil && throttled.isEmpty
            let taken = couldTake && moreToDo ? takeRequests() : 0
            if notified { settleNotification(foundWork: taken > 0 || !couldTake) }
            pushResponses()
            purgePersistentGrants()
        }
        logger.debug("ring worker stopped")
    }

    /// Before sleeping, spins for the poll window on what would wake the worker: a completion
    /// (or work the kernel holds for this thread to run, IORING_SQ_TASKRUN) and, when it may
    /// take them, requests on the ring. The frontend is not asked to notify meanwhile, so the
    /// polling saves the guest its notifications too. Whether work came.
    private func pollForWork(canTake: Bool) -> Bool {
        guard pollWindow.current > 0 else { return false }
        // What was just queued (I/O, a socket's poll) must be in flight for its completion to come.
        do { try uring.submitAndWait(minimum: 0) } catch { return true }   // the wait below reports it
        let deadline = DispatchTime.now().uptimeNanoseconds &+ pollWindow.current
        repeat {
            if uring.hasWork { return true }
            if canTake, ring.hasUnconsumedRequests {
                moreToDo = true
                return true
            }
        } while DispatchTime.now().uptimeNanoseconds < deadline
        return false
    }

    /// RING_FINAL_CHECK_FOR_REQUESTS, right before sleeping: asks the frontend to notify the
    /// next request, then looks once more; whether requests came meanwhile.
    private func requestsAfterArming() -> Bool {
        do {
            guard try ring.finalCheckForRequests() else { return false }
        } catch {
            // takeRequests halts the ring and says why.
        }
        moreToDo = true
        return true
    }

    /// Drains the handle's pending ports; whether the frontend notified us. Our port stays
    /// masked until `settleNotification` decides when to unmask it (others are unmasked
    /// now); a later event after the unmask posts another watch completion.
    private func takeEvents() -> Bool {
        eventsFired = false
        var notified = false
        do {
            for port in try eventChannels.pending() {
                if port == localPort {
                    notified = true
                    moreToDo = true
                } else {
                    try eventChannels.unmask(port)
                }
            }
        } catch {
            warn("event channel: \(error)")
        }
        return notified
    }

    /// What Linux does since XSA-332 (lateeoi): a notification that found no request is
    /// spurious; after two in a row, the port stays masked for 1 ms, then 2, 4, ... up to
    /// `maxSpuriousDelay`, so a guest notifying without pause costs dom0 a bounded share of
    /// a CPU. A notification that found work unmasks at once and resets the count.
    private func settleNotification(foundWork: Bool) {
        spuriousNotifications = foundWork ? 0 : spuriousNotifications + 1
        let delay = Self.spuriousDelay(afterSpurious: spuriousNotifications)
        guard delay > 0 else { return unmaskOurPort() }
        if spuriousNotifications == Self.spuriousWarningThreshold {
            warn("frontend notifies without requests (\(spuriousNotifications) in a row); its event channel is now unmasked late")
        }
        statistics.update { $0.spuriousEvents += 1 }
        unmaskAt = DispatchTime.now().uptimeNanoseconds + delay
    }

    static let maxSpuriousDelay: UInt64 = 64_000_000
    static let spuriousWarningThreshold = 16

    /// Nanoseconds to keep the port masked after `count` spurious notifications in a row.
    static func spuriousDelay(afterSpurious count: Int) -> UInt64 {
        guard count >= 2 else { return 0 }
        return min(1_000_000 << UInt64(min(count - 2, 20)), maxSpuriousDelay)
    }

    private func unmaskIfDue() {
        guard let unmaskAt, DispatchTime.now().uptimeNanoseconds >= unmaskAt else { return }
        unmaskOurPort()
    }

    /// Unmasks, then looks at the ring once more: a request pushed while the port was masked
    /// may have left no event behind, and one pushed after the unmask raises a new one.
    private func unmaskOurPort() {
        unmaskAt = nil
        do { try eventChannels.unmask(localPort) } catch { warn("unmasking the event channel: \(error)") }
        moreToDo = true
    }

    // MARK: taking requests (__do_block_io_op)

    /// Takes what the frontend queued (up to the budget); how many requests that was.
    @discardableResult
    private func takeRequests() -> Int {
        var taken = 0
        defer { mapAwaitingGrants() }
        do {
            while true {
                // The frontend is asked for a notification only when the worker goes to
                // sleep (requestsAfterArming).
                if try ring.unconsumedRequests() == 0 {
                    moreToDo = false
                    return taken
                }
                while let request = ring.takeRequest() {
                    dispatch(request, at: ring.requestConsumer &- 1)
                    taken += 1
                    if heldBarrier != nil { return taken }
                    if taken >= Self.requestBudget { return taken }  // moreToDo stays true
                }
            }
        } catch {
            logger.error("frontend broke the ring protocol (\(error)); no longer serving this ring")
            halt("frontend broke the ring protocol: \(error)")
            moreToDo = false
            return taken
        }
    }

    /// What a predecessor left: responses it wrote but never published are written again,
    /// requests it took and never answered are served again (reads and writes are idempotent
    /// at the block level; a flush runs again). Notifications sent while no daemon listened
    /// are lost, so the guest is notified, and the ring is checked, whatever it asked for.
    private func resume(_ recovery: RingJournal.Recovery) {
        // The journal already records these answers at these response indices.
        for (request, status) in recovery.unpublished {
            ring.putResponse(BlkifResponse(answering: request, status: status))
            responsesQueued = true
        }
        for (slot, ringIndex, request) in recovery.unanswered { dispatch(request, at: ringIndex, journalSlot: slot) }
        mapAwaitingGrants()
        pushResponses()
        do { try eventChannels.notify(localPort) } catch { warn("notifying the frontend: \(error)") }
        moreToDo = true
        logger.info("""
            took the ring over at req_cons \(recovery.requestConsumer), rsp_prod \(recovery.responseProducer): \
            \(recovery.unpublished.count) answer(s) published again, \(recovery.unanswered.count) request(s) served again
            """)
    }

    /// Classifies and counts the request, validates it once, then starts its operation.
    /// `journalSlot`: the request is already in the journal (a predecessor took it).
    private func dispatch(_ request: BlkifRequest, at ringIndex: RingIndex, journalSlot: Int? = nil) {
        guard let index = claimSlot(for: request, at: ringIndex, journalSlot: journalSlot) else { return }
        let kind = request.operationKind
        slots[index].kind = kind
        if let kind { count(kind) }
        // Discard not offered is EOPNOTSUPP whatever else is wrong with the request.
        if case .discard(let discard) = request, !device.features.discard || (discard.secure && !device.features.discardSecure) {
            return fail(index, .notSupported, discard.secure ? "secure discard not offered" : "discard not offered")
        }
        guard validate(index, { () throws(BlkifRequestError) in try request.validate(for: device.limits) }) else { return }
        switch request {
        case .readWrite(let rw):
            if (rw.operation == .writeBarrier && !device.features.barrier) || (rw.operation == .flushDiskCache && !device.features.flush) {
                return fail(index, .notSupported, "\(rw.operation) not offered")
            }
            slots[index].segments.removeAll(keepingCapacity: true)
            slots[index].segments.append(contentsOf: rw.segments)
            prepareTransfer(index, isWrite: rw.operation != .read, sectorNumber: rw.sectorNumber)
        case .indirect(let indirect):
            guard readIndirectSegments(indirect, slot: index) else { return }
            prepareTransfer(index, isWrite: indirect.indirectOperation == .write, sectorNumber: indirect.sectorNumber)
        case .discard(let discard):
            guard discard.nrSectors > 0 else { return finish(index) }
            slots[index].offset = discard.sectorNumber * UInt64(Blkif.sectorSize)
            slots[index].discardLength = discard.nrSectors * UInt64(Blkif.sectorSize)
            slots[index].secureDiscard = discard.secure
            slots[index].stage = .discard
            submitStage(index)
        case .other(let operation, _):
            // validate(for:) refuses every operation without a layout; never lose the slot.
            fail(index, .notSupported, "unsupported operation \(operation.rawValue)")
        }
    }

    /// A free slot set up for `request`, counted in flight; nil (the request answered with an
    /// error) when none is free.
    private func claimSlot(for request: BlkifRequest, at ringIndex: RingIndex, journalSlot recorded: Int?) -> Int? {
        let journalSlot = recorded ?? journal.taken(request, at: ringIndex)
        guard let index = freeSlots.popLast() else {
            // Cannot happen while slots equal ring entries; answer rather than lose the request.
            respondNow(request, .error, journalSlot: journalSlot)
            return nil
        }
        let slot = slots[index]
        slot.journalSlot = journalSlot
        slot.id = request.id
        slot.operation = request.responseOperation
        slot.status = .okay
        slot.started = DispatchTime.now().uptimeNanoseconds
        slot.outstanding = 0
        slot.transferred = 0
        slot.flushAfter = false
        slot.bytes = 0
        slot.vectorCount = 0
        inflightCount.add(1, ordering: .releasing)
        statistics.update { $0.inflight += 1 }
        return index
    }

    /// The one validate-or-fail point, for the ring entry and for the segments of indirect
    /// pages once read: false when `check` refused the request (then answered).
    private func validate(_ index: Int, _ check: () throws(BlkifRequestError) -> Void) -> Bool {
        do throws(BlkifRequestError) { try check() } catch {
            fail(index, error.responseStatus, Self.reason(error))
            return false
        }
        return true
    }

    /// What the debug log says about a refused request.
    private static func reason(_ error: BlkifRequestError) -> String {
        switch error {
        case .unsupportedOperation(let operation): "unsupported operation \(operation.rawValue)"
        case .misaligned: "misaligned request"
        default: "\(error)"
        }
    }

    private func count(_ kind: BlockOperationKind) {
        statistics.update {
            switch kind {
            case .read: $0.readRequests += 1
            case .write: $0.writeRequests += 1
            case .flush: $0.flushRequests += 1
            case .discard: $0.discardRequests += 1
            }
        }
    }

    /// Maps the indirect pages (through the persistent grants when in use), reads the
    /// segments once, lets the pages go, validates.
    private func readIndirectSegments(_ request: BlkifRequest.Indirect, slot index: Int) -> Bool {
        let slot = slots[index]
        let pages = slot.indirect
        pages.reset(refs: request.indirectGrefs, writesGuestPages: false)
        do throws(GrantRefusal) {
            try grants.plan(pages, now: slot.started)
        } catch {
            fail(index, .error, "indirect pages: \(error)")
            return false
        }
        grants.mapMissing(CollectionOfOne(pages))
        if let refusal = pages.refusal {
            fail(index, .error, "indirect pages: \(refusal)")
            return false
        }
        BlkifIndirectPage.readSegments(of: request, pages: (0..<pages.refs.count).lazy.map { UnsafeRawPointer(pages.page($0)) },
                                       into: &slot.segments)
        for failure in grants.release(pages) { warn("unmapping indirect pages: \(failure)") }
        return validate(index) { () throws(BlkifRequestError) in try request.validate(segments: slot.segments, for: device.limits) }
    }

    /// READ, WRITE, WRITE_BARRIER, FLUSH_DISKCACHE (with or without data), direct or indirect,
    /// with `segments` validated (alignment to the logical block size included).
    private func prepareTransfer(_ index: Int, isWrite: Bool, sectorNumber: UInt64) {
        let slot = slots[index]
        let barrier = slot.operation == .writeBarrier
        // FLUSH_DISKCACHE carrying data is blkfront's FUA write: write, then flush. A barrier
        // additionally waits for everything before it (Linux blkback drains, then writes).
        slot.flushAfter = barrier || slot.operation == .flushDiskCache
        slot.isWrite = isWrite
        // Nothing after a barrier is taken until it is done.
        if barrier { heldBarrier = index }
        // A flush without data carries no meaningful sector: Linux blkfront sends blk-mq's
        // (sector_t)-1 there, which must not be scaled (it overflowed: found on real Xen).
        // With segments the range is validated, so the byte offset fits.
        slot.offset = slot.segments.isEmpty ? 0 : sectorNumber * UInt64(Blkif.sectorSize)
        guard !slot.segments.isEmpty else { return startTransfer(index) }
        // Over its QoS limits the request waits, never fails; what follows it waits too.
        slot.heldSince = 0
        if !throttled.isEmpty || !admit(slot) {
            slot.heldSince = DispatchTime.now().uptimeNanoseconds
            throttled.append(index)
            statistics.update { $0.delayedRequests += 1 }
            return
        }
        planGrants(index)
    }

    /// Whether QoS lets the slot's READ or WRITE go now (taking its allowance); if not,
    /// `throttledUntil` says when to ask again.
    private func admit(_ slot: RequestSlot) -> Bool {
        let now = DispatchTime.now().uptimeNanoseconds
        let bytes = slot.segments.reduce(UInt64(0)) { $0 + UInt64($1.sectorCount) } * UInt64(Blkif.sectorSize)
        guard let wait = device.throttle.admit(isWrite: slot.isWrite, bytes: bytes, now: now) else { return true }
        throttledUntil = now + wait
        return false
    }

    /// Lets held requests go, oldest first, while QoS admits them; all of them when the
    /// ring is stopping (a stop must not wait for a low limit).
    private func admitThrottled() {
        let stopping = stopRequested.load(ordering: .acquiring)
        guard !throttled.isEmpty, stopping || DispatchTime.now().uptimeNanoseconds >= throttledUntil else { return }
        var admitted = 0
        for index in throttled {
            guard stopping || admit(slots[index]) else { break }
            let held = DispatchTime.now().uptimeNanoseconds &- slots[index].heldSince
            statistics.update { $0.throttledNanoseconds += held }
            planGrants(index)
            admitted += 1
        }
        throttled.removeFirst(admitted)
        if throttled.isEmpty { moreToDo = true }
        mapAwaitingGrants()
    }

    /// How long the loop may sleep before the head of `throttled` is due (at least 1 ms).
    private func qosWaitMilliseconds() -> Int {
        let now = DispatchTime.now().uptimeNanoseconds
        return throttledUntil <= now ? 1 : max(1, Int((throttledUntil - now + 999_999) / 1_000_000))
    }

    /// The request's refs: what the persistent grants hold, and the rest for the batch.
    private func planGrants(_ index: Int) {
        let slot = slots[index]
        // READ fills the guest's pages (writable mapping); WRITE only reads them.
        slot.data.reset(refs: slot.segments.lazy.map(\.gref), writesGuestPages: !slot.isWrite)
        do throws(GrantRefusal) {
            try grants.plan(slot.data, now: slot.started)
        } catch {
            return fail(index, .error, "data pages: \(error)")
        }
        if slot.data.copiedOverCap > 0 {
            statistics.update { $0.grantCapCopiedPages += UInt64(slot.data.copiedOverCap) }
        }
        awaitingGrants.append(index)
    }

    /// The batch's grants the persistent ones did not cover, mapped together; then each
    /// request of the batch starts in the order it was taken.
    private func mapAwaitingGrants() {
        guard !awaitingGrants.isEmpty else { return }
        grants.mapMissing(awaitingGrants.lazy.map { self.slots[$0].data })
        for index in awaitingGrants where slots[index].data.refusal == nil {
            let slot = slots[index]
            for page in slot.data.copied { slot.data.place(page, at: slot.bouncePage(page, of: slot.segments.count)) }
        }
        let refused = copyGrants(.fromGuest, of: awaitingGrants.filter { slots[$0].isWrite && slots[$0].data.refusal == nil })
        for index in awaitingGrants {
            if let refusal = slots[index].data.refusal {
                fail(index, .error, "data pages: \(refusal)")
            } else if let reason = refused[index] {
                fail(index, .error, "copying data pages: \(reason)")
            } else {
                startTransfer(index)
            }
        }
        awaitingGrants.removeAll(keepingCapacity: true)
    }

    /// The copied pages of `requests`, with one GNTTABOP_copy for all of them; when the
    /// hypervisor refuses it, request by request, so that only a request naming a bad grant
    /// fails. Returns the requests that failed, with why.
    private func copyGrants(_ direction: GrantCopyDirection, of requests: [Int]) -> [Int: String] {
        let copying = requests.filter { !slots[$0].data.copied.isEmpty }
        guard !copying.isEmpty else { return [:] }
        copySegments.removeAll(keepingCapacity: true)
        for index in copying { slots[index].copySegments(into: &copySegments) }
        do {
            // Data for the guest from a network store goes in chunks, the store's socket
            // drained between them.
            let chunk = direction == .toGuest && store != nil ? Self.copyChunkSegments : copySegments.count
            var start = 0
            while start < copySegments.count {
                let end = min(start + chunk, copySegments.count)
                try grants.copy(direction, end - start == copySegments.count ? copySegments : Array(copySegments[start..<end]))
                if end < copySegments.count { store?.drain() }
                start = end
            }
            return [:]
        } catch where copying.count == 1 {
            return [copying[0]: "\(error)"]
        } catch {
            var refused: [Int: String] = [:]
            for index in copying {
                refused.merge(copyGrants(direction, of: [index])) { first, _ in first }
            }
            return refused
        }
    }

    /// The request's pages are mapped: I/O vectors, counters, then submission (a barrier
    /// first waits for everything before it).
    private func startTransfer(_ index: Int) {
        let slot = slots[index]
        if !slot.segments.isEmpty {
            buildVectors(slot)
            let sectors = slot.bytes / UInt64(Blkif.sectorSize)
            let isWrite = slot.isWrite
            statistics.update { if isWrite { $0.writeSectors += sectors } else { $0.readSectors += sectors } }
        }
        slot.stage = slot.vectorCount > 0 ? .data : .flush
        if heldBarrier == index {
            slot.stage = .waitingForDrain
            startBarrierIfDrained()
        } else {
            submitStage(index)
        }
    }

    /// One iovec per segment (page base + first_sect × 512), merged where segments meet in
    /// the contiguous mapping.
    private func buildVectors(_ slot: RequestSlot) {
        slot.reserveVectors(slot.segments.count)
        var count = 0
        var total: UInt64 = 0
        for (page, segment) in slot.segments.enumerated() {
            let start = slot.data.page(page) + Int(segment.firstSect) * Blkif.sectorSize
            let length = Int(segment.sectorCount) * Blkif.sectorSize
            if count > 0, let previous = slot.vectors[count - 1].iov_base, previous + slot.vectors[count - 1].iov_len == start {
                slot.vectors[count - 1].iov_len += length
            } else {
                slot.vectors[count] = iovec(iov_base: start, iov_len: length)
                count += 1
            }
            total += UInt64(length)
        }
        slot.vectorCount = count
        slot.bytes = total
    }

    private func startBarrierIfDrained() {
        guard let index = heldBarrier, slots[index].stage == .waitingForDrain, inflight == 1 else { return }
        slots[index].stage = slots[index].vectorCount > 0 ? .data : .flush
        submitStage(index)
    }

    // MARK: io_uring

    /// Completion tags of the two watches; request slots use their index.
    static let eventChannelTag = UInt64.max
    static let wakeupTag = UInt64.max - 1
    /// Entries withdrawn after a refused submission, turned into no-ops.
    static let withdrawnTag = UInt64.max - 2

    private func tag(_ index: Int) -> UInt64 { UInt64(index) }

    /// The event channel or the wakeup eventfd became readable; a watch that ended (no
    /// `more`) is armed again.
    private func watchFired(_ completion: IOURing.Completion) {
        if completion.tag == Self.eventChannelTag {
            eventsFired = true
        } else {
            var count: UInt64 = 0
            _ = read(wakeup, &count, 8)
        }
        guard !completion.more else { return }
        let descriptor = completion.tag == Self.eventChannelTag ? eventChannels.fileDescriptor : wakeup
        do { try uring.watch(descriptor, tag: completion.tag) } catch { warn("watching descriptor \(descriptor) again: \(error)") }
    }

    private func submitStage(_ index: Int) {
        if let store { return submitStage(index, to: store) }
        guard case .local(let descriptor, let isBlockDevice) = device.access else { return }
        let slot = slots[index]
        do {
            switch slot.stage {
            case .data:
                var vector = 0
                var offset = slot.offset
                while vector < slot.vectorCount {
                    let count = min(Self.maxVectorsPerSubmission, slot.vectorCount - vector)
                    let pointer = UnsafePointer(slot.vectors + vector)
                    if slot.isWrite {
                        try uring.write(descriptor, pointer, count: count, offset: offset, tag: tag(index))
                    } else {
                        try uring.read(descriptor, pointer, count: count, offset: offset, tag: tag(index))
                    }
                    slot.outstanding += 1
                    for i in vector..<(vector + count) { offset += UInt64(slot.vectors[i].iov_len) }
                    vector += count
                }
            case .flush:
                try uring.flush(descriptor, tag: tag(index))
                slot.outstanding += 1
            case .discard where isBlockDevice:
                // BLKDISCARD (BLKSECDISCARD), in this thread as Linux blkback's dispatch_discard_io
                // does (io_uring gained a discard command only in Linux 6.12, and none for secure erase).
                var range: (UInt64, UInt64) = (slot.offset, slot.discardLength)
                let request = slot.secureDiscard ? BackingStore.secureDiscardRequest : BackingStore.discardRequest
                if ioctl(descriptor, request, &range) != 0 {
                    let error = errno
                    slot.status = error == EOPNOTSUPP ? .notSupported : .error
                    warn("discard of \(slot.discardLength) bytes at byte \(slot.offset) failed: \(String(cString: strerror(error)))")
                }
                return finish(index)
            case .discard:
                try uring.punchHole(descriptor, offset: slot.offset, length: slot.discardLength, tag: tag(index))
                slot.outstanding += 1
            case .idle, .waitingForDrain:
                return
            }
        } catch {
            warn("queueing I/O: \(error)")
            slot.status = .error
            if slot.outstanding == 0 { finish(index) }
        }
    }

    /// The stage as network store commands: one per contiguous run of the request's memory
    /// (its pages are copied to daemon memory, so a whole-page request is one run), at most
    /// the store's largest payload each; discards of at most 1 GiB each.
    private func submitStage(_ index: Int, to store: any NetworkStoreClient) {
        let slot = slots[index]
        let tag = tag(index)
        switch slot.stage {
        case .data:
            let maxPayload = store.maxPayload
            var offset = slot.offset
            for vector in 0..<slot.vectorCount {
                let base = slot.vectors[vector].iov_base!
                let length = slot.vectors[vector].iov_len
                var done = 0
                while done < length {
                    let count = min(maxPayload, length - done)
                    let operation: StoreCommand.Operation = slot.isWrite
                        ? .write(UnsafeRawPointer(base + done), count: count) : .read(base + done, count: count)
                    slot.outstanding += 1
                    store.submit(.init(tag: tag, operation: operation, offset: offset))
                    done += count
                    offset += UInt64(count)
                }
            }
        case .flush:
            // A server that takes no flush keeps no write cache (the NBD protocol): nothing to do.
            guard store.canFlush else { return finish(index) }
            slot.outstanding += 1
            store.submit(.init(tag: tag, operation: .flush, offset: 0))
        case .discard:
            var offset = slot.offset
            var remaining = slot.discardLength
            while remaining > 0 {
                let count = min(remaining, 1 << 30)
                slot.outstanding += 1
                store.submit(.init(tag: tag, operation: .discard(count: count), offset: offset))
                offset += count
                remaining -= count
            }
            if slot.outstanding == 0 { finish(index) }
        case .idle, .waitingForDrain:
            return
        }
    }

    private func reapCompletions() {
        uring.reapCompletions { completed($0) }
        store?.reap { completed($0) }
        if !awaitingCopyOut.isEmpty {
            let refused = copyGrants(.toGuest, of: awaitingCopyOut)
            for index in awaitingCopyOut {
                if let reason = refused[index] {
                    fail(index, .error, "copying data to the guest: \(reason)")
                } else {
                    finish(index)
                }
            }
            awaitingCopyOut.removeAll(keepingCapacity: true)
        }
        startBarrierIfDrained()
    }

    /// One finished (or withdrawn) operation of a request, or a watch that fired.
    private func completed(_ completion: IOURing.Completion) {
        switch completion.tag {
        case Self.eventChannelTag, Self.wakeupTag:
            return watchFired(completion)
        case Self.withdrawnTag:
            return
        case let tag where NBDRingClient.isPollTag(tag):
            store?.pollFired(completion)
            return
        default:
            break
        }
        let index = Int(completion.tag)
        let slot = slots[index]
        slot.outstanding -= 1
        if completion.result < 0 {
            if slot.status == .okay {
                slot.status = completion.result == -EOPNOTSUPP ? .notSupported : .error
                warn("\(slot.operation) at byte \(slot.offset) failed: \(String(cString: strerror(-completion.result)))")
            }
        } else if slot.stage == .data {
            slot.transferred += UInt64(completion.result)
        }
        guard slot.outstanding == 0 else { return }
        if slot.stage == .data && slot.status == .okay && slot.transferred != slot.bytes {
            warn("short \(slot.isWrite ? "write" : "read") at byte \(slot.offset): \(slot.transferred) of \(slot.bytes) bytes")
            slot.status = .error
        }
        if slot.stage == .data && slot.status == .okay && slot.flushAfter {
            slot.stage = .flush
            submitStage(index)
        } else if slot.stage == .data && slot.status == .okay && !slot.isWrite && !slot.data.copied.isEmpty {
            awaitingCopyOut.append(index)
        } else {
            finish(index)
        }
    }

    // MARK: responses (make_response)

    private func fail(_ index: Int, _ status: BlkifResponseStatus, _ why: String) {
        logger.debug("request \(slots[index].id) refused: \(why)")
        slots[index].status = status
        finish(index)
    }

    /// Lets the request's pages go (unmapping those not persistent), then answers it: the
    /// guest may reuse its pages once answered.
    private func finish(_ index: Int) {
        let slot = slots[index]
        for failure in grants.release(slot.data) { warn("unmapping data pages: \(failure)") }
        slot.data.reset(refs: EmptyCollection(), writesGuestPages: false)
        slot.trimBounce()
        journal.answered(slot.journalSlot, at: ring.responseProducerPrivate, status: slot.status)
        ring.putResponse(BlkifResponse(id: slot.id, operation: slot.operation, status: slot.status))
        responsesQueued = true
        let elapsed = DispatchTime.now().uptimeNanoseconds &- slot.started
        let failed = slot.status != .okay
        if failed { reportErrorResponse(slot) }
        let kind = slot.kind
        statistics.update {
            $0.inflight -= 1
            if failed { $0.errors += 1 }
            if let kind { $0.latency[kind.rawValue].record(nanoseconds: elapsed) }
        }
        if heldBarrier == index {
            heldBarrier = nil
            moreToDo = true
        }
        slot.stage = .idle
        freeSlots.append(index)
        inflightCount.subtract(1, ordering: .releasing)
    }

    /// Answers a request that got no slot.
    private func respondNow(_ request: BlkifRequest, _ status: BlkifResponseStatus, journalSlot: Int) {
        journal.answered(journalSlot, at: ring.responseProducerPrivate, status: status)
        ring.putResponse(BlkifResponse(answering: request, status: status))
        responsesQueued = true
        statistics.update { $0.errors += 1 }
    }

    private func pushResponses() {
        guard responsesQueued else { return }
        responsesQueued = false
        let notify = ring.pushResponsesAndCheckNotify()
        journal.published(ring.responseProducerPrivate)
        if notify {
            do { try eventChannels.notify(localPort) } catch { warn("notifying the frontend: \(error)") }
        }
    }

    /// Purges persistent grants when due and publishes how many stay mapped.
    private func purgePersistentGrants() {
        guard grants.persistent else { return }
        for failure in grants.purgeIfDue(now: DispatchTime.now().uptimeNanoseconds) { warn("unmapping persistent grants: \(failure)") }
        let mapped = UInt64(grants.persistentCount)
        if mapped != publishedPersistentGrants {
            publishedPersistentGrants = mapped
            statistics.update { $0.persistentGrants = mapped }
        }
    }

    /// Fault injection for tests (IOURing.failSubmissions).
    func failSubmissions(_ count: Int, errno: Int32) { uring.failSubmissions(count, errno: errno) }

    /// Why this ring stopped being served; read by the control plane.
    var haltReason: String? { haltedBecause.withLock { $0 } }
    private let haltedBecause = Locked<String?>(nil)

    /// Stops taking requests on this ring, once.
    private func halt(_ reason: String) {
        guard !halted else { return }
        halted = true
        haltedBecause.withLock { $0 = "queue \(queue): \(reason)" }
        statistics.update { $0.haltedRings = 1 }
        device.events(.ringHalted, [("queue", .number(UInt64(queue))), ("reason", .text(reason))])
    }

    /// An io-error event at most once a second per ring, with the count since the last one.
    private func reportErrorResponse(_ slot: RequestSlot) {
        errorsSinceEvent += 1
        let now = DispatchTime.now().uptimeNanoseconds
        guard now &- lastErrorEvent >= 1_000_000_000 || lastErrorEvent == 0 else { return }
        lastErrorEvent = now
        device.events(.ioError, [("queue", .number(UInt64(queue))), ("operation", .text(slot.kind.map { "\($0)" } ?? "unknown")),
                                 ("status", .text("\(slot.status)")), ("sector", .number(slot.offset / UInt64(Blkif.sectorSize))),
                                 ("count", .number(errorsSinceEvent))])
        errorsSinceEvent = 0
    }

    /// A warning at most once a second per ring, so a hostile frontend cannot flood the log.
    private func warn(_ message: String) {
        let now = DispatchTime.now().uptimeNanoseconds
        if now &- lastWarning >= 1_000_000_000 || lastWarning == 0 {
            lastWarning = now
            logger.warning("\(message)")
        } else {
            logger.debug("\(message)")
        }
    }
}

private extension BlkifRequest {
    /// The statistics class of the request; nil for operations without one (unknown ones).
    var operationKind: BlockOperationKind? {
        switch self {
        case .readWrite(let rw): rw.operation == .read ? .read : rw.operation == .write ? .write : .flush
        case .indirect(let indirect): indirect.indirectOperation == .read ? .read : .write
        case .discard: .discard
        case .other: nil
        }
    }
}
