import Engine
import Foundation
import Glibc
import Logging
import SimHypervisor
import Testing
import XenSim

/// A simulated guest with one blkif ring, driving the data plane in-process the way blkfront
/// would: its own memory, grant table and event channel handle.
final class DataPathGuest {
    static let domid: UInt32 = 1

    let dir = SimDirectory()
    let broker: BrokerThread
    let memory: GuestMemory
    let grants: GuestGrantTable
    let events: GuestEventChannels
    let services: HypervisorServices
    let dataPlane: BlkbackDataPlane
    let imagePath: String
    let ringFrame: UInt32
    let ringRef: UInt32
    var port: UInt32
    var front: FrontRing
    var nextID: UInt64 = 1

    init(imageSectors: Int = 8192, readOnly: Bool = false) throws {
        try SimDomain.createDomain(directory: dir.path, domid: Self.domid, memoryMB: 32)
        broker = try BrokerThread(directory: dir.path)
        memory = try GuestMemory(directory: dir.path, domid: Self.domid)
        grants = try GuestGrantTable(directory: dir.path, domid: Self.domid)
        events = try GuestEventChannels(directory: dir.path, domain: Self.domid)
        services = try HypervisorServices.simulator(directory: dir.path)
        var logger = Logger(label: "datapath-test")
        logger.logLevel = .warning
        dataPlane = BlkbackDataPlane(services: services, journalDirectory: dir.path, logger: logger)
        imagePath = dir.path + "/disk.img"
        let fd = open(imagePath, O_RDWR | O_CREAT | O_TRUNC, 0o600)
        precondition(fd >= 0 && ftruncate(fd, off_t(imageSectors * 512)) == 0)
        close(fd)
        ringFrame = try memory.allocatePage()
        ringRef = try grants.grantAccess(frame: ringFrame, to: 0, readOnly: false)
        port = try events.allocUnbound(remoteDomain: 0)
        front = FrontRing(initializing: SharedRing(memory: memory.page(ringFrame), pageCount: 1, protocol: .x86_64))
        self.readOnly = readOnly
    }

    let readOnly: Bool

    func request(maxIndirectSegments: Int = 256, persistentGrants: Bool = false,
                 maxPersistentGrants: Int = BackendConfiguration.defaultMaxPersistentGrants) throws -> DataPlaneRequest {
        let store = try BackingStore.open(.path(imagePath), readOnly: readOnly)
        return DataPlaneRequest(vbd: VBDIdentity(kind: "vbd", domid: DomainID(rawValue: Self.domid)!, devid: 51712),
                         backingStore: store, prepared: try dataPlane.prepare(store),
                         rings: RingDescription(protocol: .x86_64, ringPageOrder: 0,
                                                queues: [RingQueue(ringRefs: [ringRef], eventChannel: port)],
                                                persistentGrants: persistentGrants),
                         maxIndirectSegments: maxIndirectSegments, discardEnabled: true,
                         maxPersistentGrants: maxPersistentGrants)
    }

    func connect() throws -> any ConnectedRings { try dataPlane.connect(try request()) }

    /// A fresh ring (as blkfront sets up on reconnect) on the same page and port.
    func resetRing() {
        front = FrontRing(initializing: SharedRing(memory: memory.page(ringFrame), pageCount: 1, protocol: .x86_64))
    }

    func remove() {
        broker.stop()
        dir.remove()
    }

    // MARK: pages

    /// Allocates pages, fills them with `fill(pageIndex)`, grants them to dom0.
    func grantPages(_ count: Int, readOnly: Bool, fill: (Int) -> UInt8 = { _ in 0 }) throws -> (frames: [UInt32], refs: [UInt32]) {
        let frames = try memory.allocatePages(count)
        for (index, frame) in frames.enumerated() { memset(memory.page(frame), Int32(fill(index)), 4096) }
        let refs = try frames.map { try grants.grantAccess(frame: $0, to: 0, readOnly: readOnly) }
        return (frames, refs)
    }

    func release(_ pages: (frames: [UInt32], refs: [UInt32])) throws {
        for ref in pages.refs { try grants.endForeignAccess(ref) }
        memory.freePages(pages.frames)
    }

    // MARK: requests

    func makeID() -> UInt64 { defer { nextID += 1 }; return nextID }

    func readWrite(_ operation: BlkifOperation, sector: UInt64, refs: [UInt32], firstSect: UInt8 = 0,
                   lastSect: UInt8 = 7) -> BlkifRequest {
        var segments = FixedCapacityList<11, BlkifSegment>()
        for ref in refs { segments.append(BlkifSegment(gref: ref, firstSect: firstSect, lastSect: lastSect)) }
        return .readWrite(.init(operation: operation, id: makeID(), sectorNumber: sector, segments: segments))
    }

    /// Puts the requests, pushes and notifies the backend if it asked.
    func submit(_ requests: [BlkifRequest]) throws {
        for request in requests {
            let put = front.putRequest(request)
            #expect(put)
        }
        if front.pushRequestsAndCheckNotify() { try events.notify(port) }
    }

    /// Waits for `count` responses (in completion order).
    func responses(_ count: Int, within seconds: Double = 60) throws -> [BlkifResponse] {
        var collected: [BlkifResponse] = []
        let deadline = Date().addingTimeInterval(seconds)
        while collected.count < count && Date() < deadline {
            _ = try front.unconsumedResponses()
            while let response = front.takeResponse() { collected.append(response) }
            if collected.count >= count { break }
            if try front.finalCheckForResponses() { continue }
            if readable(events.fileDescriptor, within: 100) {
                for fired in try events.pending() { try events.unmask(fired) }
            }
        }
        return collected
    }

    func roundTrip(_ request: BlkifRequest) throws -> BlkifResponse? {
        try submit([request])
        return try responses(1).first
    }

    func image() throws -> Data { try Data(contentsOf: URL(fileURLWithPath: imagePath)) }
}

/// Waits until `condition` holds or `seconds` pass (a deadline that only fails a test whose
/// event never comes).
func eventually(within seconds: Double = 60, _ condition: () -> Bool) -> Bool {
    let deadline = Date().addingTimeInterval(seconds)
    while Date() < deadline {
        if condition() { return true }
        usleep(2000)
    }
    return condition()
}
