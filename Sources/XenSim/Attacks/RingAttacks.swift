import Blkif
import Foundation
import Glibc
import Hypervisor
import SimHypervisor
import Xenbus

// Abuse of the shared ring itself: impossible indices, requests changing under the
// backend's feet, and notifications without end.

extension SharedRing {
    /// The ring entry at `index`, as RING_GET_REQUEST finds it.
    func entryPointer(_ index: RingIndex) -> UnsafeMutableRawPointer {
        memory + BlkifLayout.ringHeaderSize + Int(index & (size - 1)) * layout.requestSize
    }
}

/// Where the flipping thread writes: set while a request is on the ring, nil otherwise.
final class FlipTarget: @unchecked Sendable {
    private let lock = NSLock()
    private var target: (pointer: UnsafeMutableRawPointer, flip: @Sendable (UnsafeMutableRawPointer, Bool) -> Void)?
    private(set) var flips = 0

    func set(_ pointer: UnsafeMutableRawPointer?, _ flip: @escaping @Sendable (UnsafeMutableRawPointer, Bool) -> Void) {
        lock.withLock { target = pointer.map { ($0, flip) } }
    }

    /// One flip of the current target (alternating between its two shapes).
    func flipOnce() {
        lock.withLock {
            guard let target else { return }
            flips += 1
            target.flip(target.pointer, flips & 1 == 1)
        }
    }
}

/// Runs `body` on a thread of its own until `stop` is set; `finished` is signalled at the end.
func startThread(_ name: String, _ body: @escaping @Sendable () -> Void) -> DispatchSemaphore {
    let finished = DispatchSemaphore(value: 0)
    let thread = Thread {
        body()
        finished.signal()
    }
    thread.name = name
    thread.start()
    return finished
}

extension Attack {
    static let ringIndexOverflow = Attack.onConnectedDevice(
        name: "ring-index-overflow",
        summary: "req_prod pushed 2^31 entries ahead of rsp_prod → the backend stops serving that ring (a later valid request stays unanswered); closing and reconnecting the device works",
        stillServed: "after the ring was stopped"
    ) { s in
        let queue = try s.queue
        let shared = queue.ring.shared
        let impossible = shared.responseProducer &+ 0x8000_0000
        shared.memory.storeBytes(of: impossible, toByteOffset: 0, as: RingIndex.self)  // req_prod
        try s.device.eventChannels.notify(queue.port)
        usleep(500_000)
        // Back to a plausible req_prod with one valid request: a stopped ring does not take it.
        let data = try s.grant(1)
        let request = s.readWrite(.read, sector: 0, pages: data)
        try s.send(request)
        if let response = try s.awaitResponse(request.id, timeout: 2) {
            throw AttackFailure("the backend kept serving a ring whose req_prod was \(impossible) (answered \(response.status))")
        }
        s.log("the ring is no longer served; backend state \(try s.device.backendState()?.description ?? "gone")")
        s.release(data)
    }

    static let doubleFetch = Attack.onConnectedDevice(
        name: "double-fetch",
        summary: "XSA-155: a thread flips nr_segments, sector_number and indirect segments while the backend reads them → every answer matches one whole version (untouched canary pages), never out of bounds"
    ) { s in
        let queue = try s.queue
        let layout = queue.ring.shared.layout
        let flipper = FlipTarget()
        let stop = StopFlag()
        let finished = startThread("double-fetch") {
            while !stop.isSet { flipper.flipOnce() }
        }
        defer {
            stop.set()
            finished.wait()
        }
        let pageCount = Blkif.maxSegmentsPerRequest
        let data = try s.grant(pageCount)
        defer { s.release(data) }
        var outcomes = [BlkifResponseStatus: Int]()
        let deadline = Date().addingTimeInterval(max(1, s.options.seconds / 2))

        // The flipped bytes 1...3 share the ring entry with the answer's id: answers are matched
        // without them.
        // Direct: nr_segments 1 ↔ 11 (segments 2...11 end at sector 9: invalid), sector 0 ↔ UInt64.max - 3.
        // Either version read whole is refused or reads page 1 only; pages 2...11 never change.
        let sectorOffset = layout.sectorNumberOffset
        while Date() < deadline {
            for page in data { s.pages.pointer(page).initializeMemory(as: UInt8.self, repeating: 0xA5, count: Blkif.pageSize) }
            var segments = FixedCapacityList<11, BlkifSegment>()
            segments.append(BlkifSegment(gref: data[0].ref, firstSect: 0, lastSect: 7))
            for page in data.dropFirst() { segments.append(BlkifSegment(gref: page.ref, firstSect: 0, lastSect: 9)) }
            var rw = BlkifRequest.ReadWrite(operation: .read, id: s.makeId(), sectorNumber: 0, segments: segments)
            rw.nrSegments = 1
            let entry = queue.ring.shared.entryPointer(queue.ring.requestProducerPrivate)
            flipper.set(entry) { entry, odd in
                entry.storeBytes(of: odd ? UInt8(11) : 1, toByteOffset: 1, as: UInt8.self)  // nr_segments
                entry.storeBytes(of: odd ? UInt64.max - 3 : 0, toByteOffset: sectorOffset, as: UInt64.self)
            }
            try s.send(.readWrite(rw))
            let response = try s.awaitResponse(rw.id, idMask: ~0xFF00)
            flipper.set(nil) { _, _ in }
            guard let response else { throw AttackFailure("a request changed under the backend was never answered") }
            outcomes[response.status, default: 0] += 1
            let intact = data.dropFirst().allSatisfy { s.untouched($0) }
            switch response.status {
            case .okay where intact && !s.untouched(data[0]): break
            case .error where intact && s.untouched(data[0]): break
            default:
                throw AttackFailure("answer \(response.status) matches neither version of the request: pages 2...11 \(intact ? "intact" : "written"), page 1 \(s.untouched(data[0]) ? "intact" : "written")")
            }
        }

        // Indirect: nr_segments 12 ↔ 600 in the entry, and the 12th segment's last_sect 7 ↔ 15
        // in the indirect page. Either whole version is served or refused; the daemon survives.
        if try s.backendIndirectSegments() > Blkif.maxSegmentsPerRequest {
            let more = try s.grant(1)
            defer { s.release(more) }
            let indirectDeadline = Date().addingTimeInterval(max(1, s.options.seconds / 2))
            while Date() < indirectDeadline {
                let (request, indirectPages) = try s.indirect(.read, sector: 0, segments: s.wholePages(data + more))
                let entry = queue.ring.shared.entryPointer(queue.ring.requestProducerPrivate)
                let page = SharedPointer(raw: s.pages.pointer(indirectPages[0]))
                flipper.set(entry) { entry, odd in
                    entry.storeBytes(of: odd ? UInt16(600) : 12, toByteOffset: 2, as: UInt16.self)
                    page.raw.storeBytes(of: odd ? UInt8(15) : 7, toByteOffset: 11 * BlkifSegment.byteCount + 5, as: UInt8.self)
                }
                try s.send(request)
                let response = try s.awaitResponse(request.id, idMask: ~0xFFFF_0000)
                flipper.set(nil) { _, _ in }
                s.release(indirectPages)
                guard let response else { throw AttackFailure("an indirect request changed under the backend was never answered") }
                guard response.status == .okay || response.status == .error else {
                    throw AttackFailure("an indirect request changed under the backend was answered \(response.status)")
                }
                outcomes[response.status, default: 0] += 1
            }
        }
        s.log("\(flipper.flips) flips; answers: \(outcomes.map { "\($0.key) \($0.value)" }.sorted().joined(separator: ", "))")
    }

    static let eventStorm = Attack.onConnectedDevice(
        name: "event-storm",
        summary: "XSA-332: notify the backend without pause and with no requests for --seconds, on every ring; reads issued meanwhile must still be answered"
    ) { s in
        let channels = s.device.eventChannels
        let ports = s.queues.map(\.port)
        let stop = StopFlag()
        let sent = SentCounter()
        let finished = startThread("event-storm") {
            while !stop.isSet {
                for port in ports {
                    for _ in 0..<64 { try? channels.notify(port) }
                }
                sent.add(64 * ports.count)
            }
        }
        let data = try s.grant(1)
        var latencies: [Double] = []
        let start = Date()
        do {
            while Date().timeIntervalSince(start) < s.options.seconds {
                let request = s.readWrite(.read, sector: 0, pages: data)
                let issued = Date()
                try s.send(request)
                guard let response = try s.awaitResponse(request.id) else {
                    throw AttackFailure("a READ issued during the event storm got no answer within \(s.options.answerTimeout) s")
                }
                guard response.status == .okay else { throw AttackFailure("a READ during the event storm was answered \(response.status)") }
                latencies.append(Date().timeIntervalSince(issued) * 1e6)
            }
        } catch {
            stop.set()
            finished.wait()
            throw error
        }
        stop.set()
        finished.wait()
        let elapsed = Date().timeIntervalSince(start)
        latencies.sort()
        s.log(String(format: "%.0f notifications/s for %.1f s; %d reads answered meanwhile, latency p50 %.0f us, max %.0f us",
                     Double(sent.value) / elapsed, elapsed, latencies.count, latencies[latencies.count / 2], latencies.last ?? 0))
        s.release(data)
    }
}

final class SentCounter: @unchecked Sendable {
    private let lock = NSLock()
    private var count = 0
    func add(_ n: Int) { lock.withLock { count += n } }
    var value: Int { lock.withLock { count } }
}
