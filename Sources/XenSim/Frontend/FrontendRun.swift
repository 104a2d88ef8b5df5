import Blkif
import Foundation
import Glibc
import Hypervisor
import SimHypervisor
import Xenbus

/// The numbers a run ends with; `--json` prints them as one object.
public struct FrontendReport: Sendable, Codable {
    public struct Latency: Sendable, Codable {
        public var p50: Double
        public var p99: Double
        public var p999: Double
        public var mean: Double
        public var max: Double
    }
    public var workload: WorkloadKind
    public var bs: Int
    public var qd: Int
    /// Completed reads and writes (flushes are counted apart).
    public var ops: UInt64
    public var reads: UInt64
    public var writes: UInt64
    public var flushes: UInt64
    public var discards: UInt64 = 0
    public var bytes: UInt64
    public var seconds: Double
    public var iops: Double
    public var mibPerS: Double
    public var latUs: Latency
    /// Requests answered with an error, answered wrongly, or never answered.
    public var errors: UInt64
    /// Sectors read back that did not hold what they must.
    public var verifyFailures: UInt64
    public var reconnects: Int
    /// Times the backend announced a new size while connected.
    public var resizes = 0
    /// Grants the backend still mapped when the frontend exited (their pages were not reused).
    public var grantsStillMapped: Int
    /// Pages of unanswered requests the backend still had mapped when it was seen Closed: a
    /// backend must unmap every grant before it writes Closed (requests it never took are
    /// unanswered too, legitimately, but their pages are not mapped).
    public var grantsMappedAtClosed = 0
    public var region: Region
    public var negotiated: NegotiatedDevice?
    /// Why the run ended early, if it did.
    public var error: String?
    public var interrupted: Bool

    public struct Region: Sendable, Codable {
        public var offset: UInt64
        public var size: UInt64
        /// The generation this run's writes start above (earlier runs' stamps are below).
        public var generationBase: UInt64

        enum CodingKeys: String, CodingKey { case offset, size, generationBase = "generation_base" }
    }

    enum CodingKeys: String, CodingKey {
        case workload, bs, qd, ops, reads, writes, flushes, discards, bytes, seconds, iops, mibPerS = "mib_per_s"
        case latUs = "lat_us", errors, verifyFailures = "verify_failures", reconnects, resizes
        case grantsStillMapped = "grants_still_mapped", grantsMappedAtClosed = "grants_mapped_at_closed", region, negotiated, error, interrupted
    }

    /// Success: no I/O error, no verification failure, no early end.
    public var succeeded: Bool { errors == 0 && verifyFailures == 0 && error == nil }
}

/// How the frontend behaves around the workload.
public struct FrontendConfiguration: Sendable {
    public var workload: WorkloadConfiguration
    public var device = BlockfrontOptions()
    /// When the backend closes the device during the run (an operator's "closing", a daemon
    /// restart): close our side like blkfront, then negotiate again once the backend offers
    /// the device (InitWait) and go on with the workload, re-issuing the requests it never
    /// answered (blkif_recover). Off: the run ends with an error, as a Linux guest's disk
    /// would die.
    public var reconnect = true
    /// How long to wait for the backend to come back after it closed.
    public var reconnectTimeout: TimeInterval = 60
    /// A backend silent this long with requests outstanding is declared hung.
    public var responseTimeout: TimeInterval = 30

    public init(workload: WorkloadConfiguration) { self.workload = workload }
}

/// One request on a ring and what it holds.
struct InFlightRequest {
    var io: PlannedIO
    var queue: Int
    /// What the response must carry (the inner operation of an indirect request).
    var ringOperation: BlkifOperation
    var data: [GrantedPage]
    var indirect: [GrantedPage]
    var started: UInt64
}

/// The guest's I/O path (blkif_queue_request, blkif_interrupt, blkif_completion): grants
/// pages per request, puts requests, notifies when the backend asks for it, waits on the
/// event channel, takes responses with the final-check rule, ends the grants, verifies.
public final class FrontendRun {
    let device: Blockfront
    let configuration: FrontendConfiguration
    private let log: (String) -> Void
    private var workload: Workload
    private var negotiated: NegotiatedDevice
    private var inFlight: [UInt64: InFlightRequest] = [:]
    private var requeued: [PlannedIO] = []
    private var nextId: UInt64 = 1
    private var nextQueue = 0
    private var queueDepth: Int
    private var flushSupported: Bool
    private var latency = LatencyPercentiles()
    private var report: FrontendReport
    private var lastProgress = monotonicNanoseconds()

    /// Connects the device and prepares the workload; throws a one-line failure when the
    /// device cannot be connected or the workload does not fit the disk.
    public init(device: Blockfront, configuration: FrontendConfiguration, log: @escaping (String) -> Void) throws {
        self.device = device
        self.configuration = configuration
        self.log = log
        negotiated = try device.connect()
        let base = UInt64(Date().timeIntervalSince1970 * 1_000_000_000)
        do {
            workload = try Workload(configuration.workload, diskSectors: negotiated.sectors, sectorSize: negotiated.sectorSize,
                                    readOnly: negotiated.readOnly, generationBase: base)
        } catch {
            device.close()
            throw FrontendFailure(error.description)
        }
        queueDepth = 1
        flushSupported = negotiated.features.flush || negotiated.features.barrier
        report = FrontendReport(
            workload: configuration.workload.kind, bs: configuration.workload.blockSize, qd: 0, ops: 0, reads: 0,
            writes: 0, flushes: 0, bytes: 0, seconds: 0, iops: 0, mibPerS: 0,
            latUs: .init(p50: 0, p99: 0, p999: 0, mean: 0, max: 0), errors: 0, verifyFailures: 0, reconnects: 0,
            grantsStillMapped: 0,
            region: .init(offset: configuration.workload.offset, size: workload.regionBytes, generationBase: base),
            negotiated: negotiated, error: nil, interrupted: false)
        do {
            try adopt(negotiated)
        } catch {
            device.close()
            throw error
        }
    }

    /// Checks the request size against what was negotiated and clamps the queue depth to
    /// the rings (and to the blocks, so every I/O can have a block of its own).
    private func adopt(_ device: NegotiatedDevice) throws {
        let bs = configuration.workload.blockSize
        // A DISCARD names a range, not pages: no segment limit applies.
        guard bs <= device.maxRequestBytes || configuration.workload.kind == .discard else {
            throw FrontendFailure(device.indirectSegments == 0
                ? "--bs \(bs) needs more than \(Blkif.maxSegmentsPerRequest) segments and the device has no indirect segments negotiated; use --bs \(device.maxRequestBytes) or less"
                : "--bs \(bs) exceeds the \(device.indirectSegments) indirect segments negotiated (\(device.maxRequestBytes) bytes)")
        }
        if configuration.workload.kind == .discard && !device.features.discard {
            throw FrontendFailure("the backend offers no discard (feature-discard=0); --workload discard needs it")
        }
        if negotiated.sectors != device.sectors {
            throw FrontendFailure("the disk changed size across the reconnect (\(negotiated.sectors) → \(device.sectors) sectors)")
        }
        negotiated = device
        report.negotiated = device
        queueDepth = max(1, min(configuration.workload.queueDepth, Int(device.ringSize) * device.queues, workload.blockCount))
        report.qd = queueDepth
    }

    // MARK: the loop

    /// Runs the workload to its end (or until `stopRequested` says so), closes the device
    /// and returns the numbers.
    public func run(stopRequested: () -> Bool) -> FrontendReport {
        let start = monotonicNanoseconds()
        do {
            try loop(start: start, stopRequested: stopRequested)
        } catch {
            report.error = "\(error)"
            // Requests that will never be answered failed.
            report.errors += UInt64(inFlight.count + requeued.count)
        }
        let elapsed = Double(monotonicNanoseconds() - start) / 1e9
        report.grantsStillMapped = device.close()
        finish(elapsed: elapsed)
        return report
    }

    private func loop(start: UInt64, stopRequested: () -> Bool) throws {
        while true {
            if stopRequested() && !report.interrupted {
                report.interrupted = true
                workload.stop()
            }
            if let seconds = configuration.workload.seconds, Double(monotonicNanoseconds() - start) / 1e9 >= seconds {
                workload.stop()
            }
            try issue()
            if workload.finished && requeued.isEmpty && inFlight.isEmpty { return }

            var fds = [pollfd(fd: device.eventChannels.fileDescriptor, events: Int16(POLLIN), revents: 0),
                       pollfd(fd: device.watchDescriptor, events: Int16(POLLIN), revents: 0)]
            _ = poll(&fds, 2, 100)
            if fds[0].revents != 0 { try handleEvents() }
            if fds[1].revents != 0, device.takeStateEvents() {
                let state = try device.backendState()
                if state != .connected { try backendClosed(state) } else { try revalidateSize() }
            }
            if !device.pages.busy.isEmpty { device.pages.retryBusy() }
            if !inFlight.isEmpty,
               Double(monotonicNanoseconds() - lastProgress) / 1e9 > configuration.responseTimeout {
                throw FrontendFailure("backend answered none of \(inFlight.count) request(s) for \(Int(configuration.responseTimeout)) s")
            }
        }
    }

    /// Puts requests until the queue depth is reached or the workload has nothing now, then
    /// pushes each ring and notifies where the backend asked for it.
    private func issue() throws {
        var touched = Set<Int>()
        while inFlight.count < queueDepth {
            guard let io = requeued.popLast() ?? workload.next() else { break }
            if io.operation == .flush && !flushSupported {
                workload.completed(io, success: true)  // nothing to flush through
                continue
            }
            touched.insert(try submit(io))
        }
        for index in touched.sorted() {
            let queue = device.queues[index]
            if queue.ring.pushRequestsAndCheckNotify() { try device.eventChannels.notify(queue.port) }
        }
    }

    /// Builds and puts one request; returns its queue.
    private func submit(_ io: PlannedIO) throws -> Int {
        let queues = device.queues
        var index = nextQueue
        for _ in 0..<queues.count where queues[index].ring.freeRequestSlots == 0 { index = (index + 1) % queues.count }
        nextQueue = (index + 1) % queues.count
        let queue = queues[index]
        let id = nextId
        nextId &+= 1
        let handle = UInt16(truncatingIfNeeded: device.devid)
        var request: BlkifRequest
        var data: [GrantedPage] = [], indirect: [GrantedPage] = []

        if io.operation == .discard {
            request = .discard(.init(handle: handle, id: id, sectorNumber: io.sector, nrSectors: UInt64(io.sectorCount)))
        } else if io.operation == .flush {
            let operation: BlkifOperation = negotiated.features.flush ? .flushDiskCache : .writeBarrier
            // Like blkfront: a flush request's position is blk-mq's unset (sector_t)-1.
            request = .readWrite(.init(operation: operation, handle: handle, id: id, sectorNumber: .max))
        } else {
            let write = io.operation == .write
            let sectorsPerPage = Int(Blkif.sectorsPerPage)
            let pageCount = (io.sectorCount + sectorsPerPage - 1) / sectorsPerPage
            data = try takePages(pageCount, queue: queue, readOnly: write) { page, memory in
                guard write else { return }
                for s in 0..<min(sectorsPerPage, io.sectorCount - page * sectorsPerPage) {
                    SectorStamp.write(sector: io.sector + UInt64(page * sectorsPerPage + s), generation: io.generation,
                                      to: memory + s * SectorStamp.sectorSize)
                }
            }
            let segments = data.enumerated().map { page, granted in
                let sectors = min(sectorsPerPage, io.sectorCount - page * sectorsPerPage)
                return BlkifSegment(gref: granted.ref, firstSect: 0, lastSect: UInt8(sectors - 1))
            }
            let operation: BlkifOperation = write ? .write : .read
            if segments.count <= Blkif.maxSegmentsPerRequest {
                var list = FixedCapacityList<11, BlkifSegment>()
                segments.forEach { list.append($0) }
                request = .readWrite(.init(operation: operation, handle: handle, id: id, sectorNumber: io.sector, segments: list))
            } else {
                let perPage = Blkif.segmentsPerIndirectPage
                do {
                    indirect = try takePages(Blkif.indirectPages(forSegments: segments.count), queue: queue,
                                             readOnly: true) { page, memory in
                        BlkifIndirectPage.write(segments[(page * perPage)..<min(segments.count, (page + 1) * perPage)], to: memory)
                    }
                } catch {
                    giveBack(data, queue: queue)
                    throw error
                }
                var grefs = FixedCapacityList<8, UInt32>()
                indirect.forEach { grefs.append($0.ref) }
                request = .indirect(.init(indirectOperation: operation, nrSegments: UInt16(segments.count), handle: handle,
                                          id: id, sectorNumber: io.sector, indirectGrefs: grefs))
            }
        }
        guard queue.ring.putRequest(request) else {
            // Cannot happen: the queue depth is clamped to the rings' slots.
            giveBack(data + indirect, queue: queue)
            throw FrontendFailure("ring \(index) is full with \(inFlight.count) requests in flight")
        }
        if inFlight.isEmpty { lastProgress = monotonicNanoseconds() }
        // blkif_interrupt accepts only a response carrying the request's operation, the inner
        // one (READ/WRITE) for an indirect request.
        let answeredOperation: BlkifOperation
        if case .indirect(let r) = request { answeredOperation = r.indirectOperation } else { answeredOperation = request.operation }
        inFlight[id] = InFlightRequest(io: io, queue: index, ringOperation: answeredOperation, data: data,
                                       indirect: indirect, started: monotonicNanoseconds())
        return index
    }

    /// Pages for one request: from the ring's persistent grants when negotiated, else granted
    /// for this request alone (read-only when the backend only reads them).
    private func takePages(_ count: Int, queue: BlockfrontQueue, readOnly: Bool,
                           fill: (Int, UnsafeMutableRawPointer) -> Void) throws -> [GrantedPage] {
        if negotiated.persistentGrants {
            return try queue.persistentPages(count, pages: device.pages, backend: negotiated.backendId, fill: fill)
        }
        return try device.pages.grant(count, to: negotiated.backendId, readOnly: readOnly, fill: fill)
    }

    /// A request's pages once it is answered: back to the persistent pool, or grants ended.
    private func giveBack(_ pages: [GrantedPage], queue: BlockfrontQueue) {
        if negotiated.persistentGrants {
            queue.returnPersistent(pages, pages: device.pages)
        } else {
            device.pages.release(pages)
        }
    }

    /// blkif_interrupt: for each port that fired, take every response, then unmask.
    private func handleEvents() throws {
        let fired = try device.eventChannels.pending()
        for queue in device.queues where fired.contains(queue.port) { try drain(queue) }
        for port in fired { try device.eventChannels.unmask(port) }
    }

    /// Takes responses until the ring is empty with rsp_event armed (RING_FINAL_CHECK_FOR_RESPONSES),
    /// so a response that races with the arming is not left behind.
    private func drain(_ queue: BlockfrontQueue) throws {
        do {
            repeat {
                _ = try queue.ring.unconsumedResponses()
                while let response = queue.ring.takeResponse() { complete(response, on: queue.index) }
            } while try queue.ring.finalCheckForResponses()
        } catch {
            throw FrontendFailure("backend broke the ring protocol on queue \(queue.index): \(error)")
        }
    }

    private func complete(_ response: BlkifResponse, on queue: Int) {
        guard let request = inFlight[response.id], request.queue == queue else {
            log("backend answered id \(response.id) on queue \(queue), which has no such request in flight")
            report.errors += 1
            return
        }
        inFlight[response.id] = nil
        let now = monotonicNanoseconds()
        lastProgress = now
        latency.record(nanoseconds: now &- request.started)
        let io = request.io
        var success = response.status == .okay && response.operation == request.ringOperation
        if response.status == .notSupported && io.operation == .flush {
            // blkfront: "flush disabled", the write cache is then the backend's business.
            log("backend refused \(request.ringOperation) with EOPNOTSUPP; no more flushes")
            flushSupported = false
            success = true
        } else if !success {
            report.errors += 1
            log("\(io.operation) of \(io.sectorCount) sector(s) at \(io.sector) failed: status \(response.status.rawValue)")
        }
        if success && io.operation == .read {
            let sectorsPerPage = Int(Blkif.sectorsPerPage)
            let failures = workload.verify(io) { k in
                UnsafeRawPointer(device.pages.pointer(request.data[k / sectorsPerPage]) + (k % sectorsPerPage) * SectorStamp.sectorSize)
            }
            if failures > 0 {
                report.verifyFailures += UInt64(failures)
                log("read of \(io.sectorCount) sector(s) at \(io.sector): \(failures) sector(s) do not hold what was written")
            }
        }
        giveBack(request.data + request.indirect, queue: device.queues[queue])
        workload.completed(io, success: success)
        guard success else { return }
        switch io.operation {
        case .read: report.reads += 1
        case .write: report.writes += 1
        case .flush: report.flushes += 1
        case .discard: report.discards += 1
        }
        if io.operation == .read || io.operation == .write { report.bytes += UInt64(io.byteCount) }
    }

    /// blkfront_connect on a backend that wrote Connected again: an online resize. The new
    /// size is taken; the workload's region stays where it is.
    private func revalidateSize() throws {
        let sectors = try device.backendSectors()
        guard sectors != negotiated.sectors else { return }
        log("disk resized: \(negotiated.sectors) → \(sectors) sectors")
        negotiated.sectors = sectors
        report.negotiated = negotiated
        report.resizes += 1
    }

    // MARK: the backend closing under us

    /// blkfront_closing: the backend went away from Connected. Close our side, collect the
    /// answers it still gives, then (with reconnect) negotiate again and re-issue the rest.
    private func backendClosed(_ state: XenbusState?) throws {
        log("backend \(negotiated.backendPath) went \(state?.description ?? "away") during the workload")
        if state != nil { try device.acknowledgeBackendClosing() }
        // The backend finishes in-flight I/O before it reaches Closed; its answers still count.
        let deadline = Date().addingTimeInterval(configuration.device.timeout)
        var seenClosed = false
        while true {
            // The state before the ring: answers pushed before Closed was written are seen.
            let now = try device.backendState()
            for queue in device.queues { try drain(queue) }
            seenClosed = now == .closed
            if inFlight.isEmpty || now == nil || now == .closed || Date() >= deadline { break }
            var fd = pollfd(fd: device.eventChannels.fileDescriptor, events: Int16(POLLIN), revents: 0)
            _ = poll(&fd, 1, 50)
            _ = try? device.eventChannels.pending().forEach { try device.eventChannels.unmask($0) }
        }
        // Unanswered requests are re-issued after the reconnect, with fresh grants.
        let busyBefore = device.pages.busy.count
        for request in inFlight.values.sorted(by: { $0.started > $1.started }) {
            device.pages.release(request.data + request.indirect)
            requeued.append(request.io)
        }
        if seenClosed, device.pages.busy.count > busyBefore {
            // blkfront would now take back pages the backend may still be filling.
            log("backend wrote Closed with \(device.pages.busy.count - busyBefore) page(s) of unanswered requests still mapped")
            report.grantsMappedAtClosed += device.pages.busy.count - busyBefore
        }
        inFlight = [:]
        device.releaseRings()
        _ = device.takeStateEvents()

        guard configuration.reconnect else {
            throw FrontendFailure("the backend closed the device during the workload" + (device.backendError().map { ": \($0)" } ?? ""))
        }
        guard try device.backendState() != nil, device.backendOnline() else {
            throw FrontendFailure("the device was detached during the workload (backend \(negotiated.backendPath) is going away)")
        }
        // Wait for the backend to offer the device again by itself (InitWait). Knocking with
        // Initialising would reopen a device an operator closed on purpose.
        try device.waitForBackend("InitWait again", timeout: configuration.reconnectTimeout, fail: { $0 == nil }) {
            $0 == .initWait
        }
        log("reconnecting to \(negotiated.backendPath)")
        let again = try device.connect()
        try adopt(again)
        flushSupported = again.features.flush || again.features.barrier
        report.reconnects += 1
        lastProgress = monotonicNanoseconds()
    }

    private func finish(elapsed: Double) {
        report.seconds = elapsed
        report.ops = report.reads + report.writes
        report.iops = elapsed > 0 ? Double(report.ops) / elapsed : 0
        report.mibPerS = elapsed > 0 ? Double(report.bytes) / 1_048_576 / elapsed : 0
        let us = { (ns: UInt64) in (Double(ns) / 1000 * 1000).rounded() / 1000 }
        report.latUs = .init(p50: us(latency.percentile(50)), p99: us(latency.percentile(99)),
                             p999: us(latency.percentile(99.9)), mean: (latency.meanNanoseconds).rounded() / 1000,
                             max: us(latency.maxNanoseconds))
    }
}

func monotonicNanoseconds() -> UInt64 {
    var now = timespec()
    clock_gettime(CLOCK_MONOTONIC, &now)
    return UInt64(now.tv_sec) * 1_000_000_000 + UInt64(now.tv_nsec)
}
