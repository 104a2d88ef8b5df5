import Blkif
import Foundation
import Glibc
import Hypervisor
import SimHypervisor
import Xenbus

/// The backend did not behave as specified: what it did instead, one line (exit status 1).
public struct AttackFailure: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// Where the malicious guest attacks and how long it waits for answers.
public struct AttackOptions: Sendable {
    public var directory: String
    public var domid: UInt32
    public var devid: UInt32
    public var kind = "vbd"
    /// How long an answer (or a state change) may take before the backend counts as silent.
    public var answerTimeout: TimeInterval = 5
    /// How long storms and floods last.
    public var seconds: Double = 3
    /// The rings the attacker asks for: queues and ring page order (the backend may offer less).
    public var queues = 1
    public var ringPageOrder = 0
    /// The ring ABI the attacker writes (its `protocol` node).
    public var `protocol` = BlkifProtocol.native

    public init(directory: String, domid: UInt32, devid: UInt32) {
        self.directory = directory
        self.domid = domid
        self.devid = devid
    }
}

/// A guest that negotiates like xen-blkfront (reusing Blockfront), then speaks raw blkif on
/// its first ring: any request shape, any grant, and waits for the backend's answers.
public final class AttackSession {
    let options: AttackOptions
    let device: Blockfront
    let log: (String) -> Void
    private var nextId: UInt64 = 0xA77A_0000
    /// Answers taken off the ring that nobody waited for yet, by id.
    private var answered: [UInt64: BlkifResponse] = [:]

    /// `pages`: those of another session of the same guest (see Blockfront).
    init(options: AttackOptions, store: XenStore, log: @escaping (String) -> Void, pages: GrantedPages?) throws {
        self.options = options
        self.log = log
        var deviceOptions = BlockfrontOptions()
        deviceOptions.timeout = max(options.answerTimeout, 10)
        deviceOptions.maxIndirectSegments = Blkif.maxIndirectSegments
        // Raw requests grant pages per request, read-only where the backend only reads them;
        // with persistent grants the backend maps every page writable, so attacks on them
        // ask for them explicitly (GrantAttacks).
        deviceOptions.persistentGrants = false
        deviceOptions.queues = options.queues
        deviceOptions.ringPageOrder = options.ringPageOrder
        deviceOptions.protocol = options.protocol
        device = try Blockfront(store: store, directory: options.directory, domid: options.domid, devid: options.devid,
                                kind: options.kind, options: deviceOptions, pages: pages)
    }

    var store: XenStore { device.store }
    var pages: GrantedPages { device.pages }
    var backendId: UInt32 { device.backendId }
    /// Every ring of the device.
    var queues: [BlockfrontQueue] { device.queues }

    var queue: BlockfrontQueue {
        get throws {
            guard let queue = device.queues.first else { throw FrontendFailure("the device is not connected") }
            return queue
        }
    }

    /// Negotiates the device normally (closing whatever an earlier guest left half open).
    @discardableResult
    func connect() throws -> NegotiatedDevice { try device.connect() }

    /// Runs `body` on a device negotiated without persistent grants, then with them; `body`
    /// gets words naming the mode, for its messages.
    func withAndWithoutPersistentGrants(_ body: (_ persistent: Bool, _ mode: String) throws -> Void) throws {
        for persistent in [false, true] {
            try reconnect(persistentGrants: persistent)
            try body(persistent, persistent ? "with persistent grants" : "without persistent grants")
        }
    }

    /// Closes the device like blkfront and negotiates again, with or without persistent
    /// grants; fails when the backend does not agree to them.
    func reconnect(persistentGrants: Bool) throws {
        device.close()
        device.options.persistentGrants = persistentGrants
        let negotiated = try device.connect()
        guard negotiated.persistentGrants == persistentGrants else {
            throw AttackFailure("persistent grants \(persistentGrants ? "asked for" : "not asked for"), yet negotiated \(negotiated.persistentGrants)")
        }
    }

    /// The backend's feature-max-indirect-segments (0 when indirect requests are not offered).
    func backendIndirectSegments() throws -> Int {
        Int(try store.read("\(device.backendPath)/feature-max-indirect-segments").flatMap { UInt32($0) } ?? 0)
    }

    func makeId() -> UInt64 {
        nextId &+= 1
        return nextId
    }

    // MARK: grants

    /// Pages granted to the backend, each filled with `byte`.
    func grant(_ count: Int, readOnly: Bool = false, filledWith byte: UInt8 = 0xA5) throws -> [GrantedPage] {
        try pages.grant(count, to: backendId, readOnly: readOnly) { _, page in
            page.initializeMemory(as: UInt8.self, repeating: byte, count: Blkif.pageSize)
        }
    }

    /// Whether every byte of `page` still is `byte` (the backend wrote nothing into it).
    func untouched(_ page: GrantedPage, filledWith byte: UInt8 = 0xA5) -> Bool {
        let memory = UnsafeRawBufferPointer(start: pages.pointer(page), count: Blkif.pageSize)
        return memory.allSatisfy { $0 == byte }
    }

    func release(_ granted: [GrantedPage]) { pages.release(granted) }

    // MARK: the ring

    /// Puts the request on the first ring, publishes it and notifies whatever the backend asked.
    func send(_ request: BlkifRequest) throws {
        let queue = try queue
        guard queue.ring.putRequest(request) else { throw FrontendFailure("the ring is full") }
        _ = queue.ring.pushRequestsAndCheckNotify()
        try device.eventChannels.notify(queue.port)
    }

    /// The answer to `id`, or nil when none came within `timeout` (the answer timeout by default).
    /// `idMask` leaves out id bits the guest itself may have scribbled over: responses share
    /// the ring entry with the request, so a thread still changing the request hits the answer.
    func awaitResponse(_ id: UInt64, timeout: TimeInterval? = nil, idMask: UInt64 = .max) throws -> BlkifResponse? {
        let deadline = Date().addingTimeInterval(timeout ?? options.answerTimeout)
        while true {
            try drain()
            if let key = answered.keys.first(where: { $0 & idMask == id & idMask }) { return answered.removeValue(forKey: key) }
            let remaining = deadline.timeIntervalSinceNow
            if remaining <= 0 { return nil }
            var fd = pollfd(fd: device.eventChannels.fileDescriptor, events: Int16(POLLIN), revents: 0)
            _ = poll(&fd, 1, Int32(min(remaining, 0.05) * 1000) + 1)
            if fd.revents != 0 {
                for port in try device.eventChannels.pending() { try device.eventChannels.unmask(port) }
            }
        }
    }

    /// Takes every response on the ring (RING_FINAL_CHECK_FOR_RESPONSES rule).
    private func drain() throws {
        let queue = try queue
        do {
            repeat {
                _ = try queue.ring.unconsumedResponses()
                while let response = queue.ring.takeResponse() { answered[response.id] = response }
            } while try queue.ring.finalCheckForResponses()
        } catch {
            throw AttackFailure("the backend broke the ring protocol: \(error)")
        }
    }

    /// Sends `request` and requires an answer with one of `statuses`; returns the answer.
    @discardableResult
    func expect(_ request: BlkifRequest, _ statuses: Set<BlkifResponseStatus>, _ what: String) throws -> BlkifResponse {
        try send(request)
        guard let response = try awaitResponse(request.id) else {
            throw AttackFailure("\(what): no answer within \(options.answerTimeout) s (the backend must answer every request it takes)")
        }
        guard statuses.contains(response.status) else {
            throw AttackFailure("\(what): answered \(response.status) instead of \(statuses.map { "\($0)" }.sorted().joined(separator: " or "))")
        }
        // Linux blkback answers an indirect request with its inner operation; blkfront checks it.
        guard response.operation == request.responseOperation else {
            throw AttackFailure("\(what): the answer names operation \(response.operation.rawValue), not \(request.responseOperation.rawValue)")
        }
        log("\(what): \(response.status) as required")
        return response
    }

    /// Requires an error answer (BLKIF_RSP_ERROR) and that `canaries` were left untouched.
    func expectRefused(_ request: BlkifRequest, _ what: String, canaries: [GrantedPage] = [],
                       statuses: Set<BlkifResponseStatus> = [.error]) throws {
        try expect(request, statuses, what)
        for page in canaries where !untouched(page) {
            throw AttackFailure("\(what): refused, yet the backend wrote into guest page \(page.frame)")
        }
    }

    /// A READ or WRITE of whole pages starting at `sector`, one segment per page.
    func readWrite(_ operation: BlkifOperation, sector: UInt64, pages granted: [GrantedPage],
                   firstSect: UInt8 = 0, lastSect: UInt8 = 7) -> BlkifRequest {
        var segments = FixedCapacityList<11, BlkifSegment>()
        for page in granted.prefix(Blkif.maxSegmentsPerRequest) {
            segments.append(BlkifSegment(gref: page.ref, firstSect: firstSect, lastSect: lastSect))
        }
        return .readWrite(.init(operation: operation, handle: UInt16(truncatingIfNeeded: options.devid), id: makeId(),
                                sectorNumber: sector, segments: segments))
    }

    /// Reads `count` pages at `sector` and returns their bytes; the backend must say okay.
    func readBack(sector: UInt64, count: Int, _ what: String) throws -> [UInt8] {
        let data = try grant(count, filledWith: 0x5A)
        defer { release(data) }
        try expect(readWrite(.read, sector: sector, pages: data), [.okay], what)
        return data.flatMap { Array(UnsafeRawBufferPointer(start: pages.pointer($0), count: Blkif.pageSize)) }
    }

    // MARK: the end of every attack

    /// The daemon still serves this device: close it like blkfront, negotiate again, and run a
    /// small verified workload (write, flush, read back; reads only on a read-only disk).
    /// Every grant must come back at the end: nothing stays mapped.
    @discardableResult
    func verifyStillServed(_ what: String = "after the attack") throws -> FrontendReport {
        let readOnly = device.negotiated?.readOnly ?? false
        var workload = WorkloadConfiguration(kind: readOnly ? .read : .verify, blockSize: 4096, queueDepth: 4)
        workload.offset = 0
        workload.size = 64 << 10
        var configuration = FrontendConfiguration(workload: workload)
        configuration.device = device.options
        configuration.reconnect = false
        configuration.responseTimeout = max(options.answerTimeout, 10)
        let run: FrontendRun
        do {
            run = try FrontendRun(device: device, configuration: configuration, log: log)
        } catch {
            throw AttackFailure("\(what): the device could not be negotiated again: \(error)")
        }
        let report = run.run { false }
        guard report.succeeded else {
            throw AttackFailure("\(what): verified I/O failed (\(report.errors) errors, \(report.verifyFailures) verify failures\(report.error.map { ": \($0)" } ?? ""))")
        }
        guard report.grantsStillMapped == 0 else {
            throw AttackFailure("\(what): \(report.grantsStillMapped) grant(s) still mapped by the backend after the device closed")
        }
        log("\(what): reconnected and \(report.ops) verified I/O(s) succeeded, no grant left mapped")
        return report
    }

    /// Closes the device (Closing, Closed, grants back); returns grants still mapped after
    /// retrying for up to the answer timeout.
    func closeAndCountMappedGrants() -> Int {
        var left = device.close()
        let deadline = Date().addingTimeInterval(options.answerTimeout)
        while left > 0 && Date() < deadline {
            usleep(50_000)
            left = pages.retryBusy()
        }
        return left
    }
}

/// A flag another thread can read while this one sets it (the flipping and storm threads).
final class StopFlag: @unchecked Sendable {
    private let lock = NSLock()
    private var stopped = false
    var isSet: Bool { lock.withLock { stopped } }
    func set() { lock.withLock { stopped = true } }
}

/// A raw pointer handed to a helper thread; the attack keeps the page alive meanwhile.
struct SharedPointer: @unchecked Sendable {
    let raw: UnsafeMutableRawPointer
}
