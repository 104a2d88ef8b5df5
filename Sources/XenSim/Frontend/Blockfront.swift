import Blkif
import Foundation
import Glibc
import Hypervisor
import SimHypervisor
import Xenbus

/// What the guest asks for; the backend's offers clamp it as in xen-blkfront.
public struct BlockfrontOptions: Sendable {
    public var queues = 1
    public var ringPageOrder = 0
    /// feature-persistent written; used when the backend offers it too.
    public var persistentGrants = true
    public var indirect = true
    /// blkfront's max_indirect_segments module parameter (default 32).
    public var maxIndirectSegments = 32
    public var `protocol` = BlkifProtocol.native
    /// How long to wait for each backend step (InitWait, Connected, Closed).
    public var timeout: TimeInterval = 10

    public init() {}
}

/// What frontend and backend agreed on, and the disk the backend described at Connected.
public struct NegotiatedDevice: Sendable, Codable, Equatable {
    public struct Features: Sendable, Codable, Equatable {
        public var flush: Bool
        public var barrier: Bool
        public var discard: Bool
        /// The backend's feature-persistent offer.
        public var persistent: Bool
    }
    public var backendPath: String
    public var backendId: UInt32
    public var `protocol`: String
    public var queues: Int
    public var ringPageOrder: Int
    public var ringSize: UInt32
    public var persistentGrants: Bool
    /// Segments per indirect request; 0 when only direct requests (≤ 11 segments) are used.
    public var indirectSegments: Int
    public var sectors: UInt64
    public var sectorSize: Int
    public var physicalSectorSize: Int
    public var info: UInt32
    public var readOnly: Bool
    public var features: Features

    enum CodingKeys: String, CodingKey {
        case backendPath = "backend_path", backendId = "backend_id", `protocol`, queues
        case ringPageOrder = "ring_page_order", ringSize = "ring_size", persistentGrants = "persistent_grants"
        case indirectSegments = "indirect_segments", sectors, sectorSize = "sector_size"
        case physicalSectorSize = "physical_sector_size", info, readOnly = "read_only", features
    }

    /// The largest request in bytes: 11 direct segments or the indirect maximum.
    public var maxRequestBytes: Int { max(Blkif.maxSegmentsPerRequest, indirectSegments) * Blkif.pageSize }
}

/// A failure the user sees as one line.
public struct FrontendFailure: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// The xenbus half of xen-blkfront for one VBD, through the guest's own xenstore connection:
/// talk_to_blkback (rings, event channels, the keys in one transaction, Initialised),
/// blkfront_connect (the disk's size and features, Connected), and closing.
public final class Blockfront {
    let store: XenStore
    public let domid: UInt32
    public let devid: UInt32
    public let frontendPath: String
    public private(set) var backendPath: String
    public private(set) var backendId: UInt32
    /// What the next connect asks for (a guest rebooted with other module parameters may change it).
    var options: BlockfrontOptions
    let pages: GrantedPages
    let eventChannels: GuestEventChannels
    private(set) var queues: [BlockfrontQueue] = []
    public private(set) var negotiated: NegotiatedDevice?
    private let watchToken = "blkfront-backend-state"

    /// `store` must be domain `domid`'s own connection (DIR/dom<N>.sock), so every access
    /// carries the guest's permissions.
    /// `pages`: the guest's granted pages when another device of this guest in this process
    /// has them already (a domain has one grant table; two allocators would hand out one ref twice).
    init(store: XenStore, directory: String, domid: UInt32, devid: UInt32, kind: String = "vbd",
         options: BlockfrontOptions, pages shared: GrantedPages?) throws {
        self.store = store
        self.domid = domid
        self.devid = devid
        self.options = options
        frontendPath = "/local/domain/\(domid)/device/\(kind)/\(devid)"
        guard let backend = try store.read("\(frontendPath)/backend") else {
            throw FrontendFailure("no device \(devid) in domain \(domid) (\(frontendPath)/backend missing); attach it with `xensim attach`")
        }
        backendPath = backend
        let idText = try store.read("\(frontendPath)/backend-id") ?? "0"
        guard let id = UInt32(idText) else { throw FrontendFailure("\(frontendPath)/backend-id is '\(idText)', not a domid") }
        backendId = id
        pages = try shared ?? GrantedPages(memory: try GuestMemory(directory: directory, domid: domid),
                                           grants: try GuestGrantTable(directory: directory, domid: domid))
        eventChannels = try GuestEventChannels(directory: directory, domain: domid)
        try store.watch("\(backendPath)/state", token: watchToken)
    }

    public convenience init(store: XenStore, directory: String, domid: UInt32, devid: UInt32, kind: String = "vbd",
                            options: BlockfrontOptions) throws {
        try self.init(store: store, directory: directory, domid: domid, devid: devid, kind: kind, options: options, pages: nil)
    }

    deinit {
        try? store.unwatch("\(backendPath)/state", token: watchToken)
        releaseRings()
    }

    // MARK: states

    /// The backend's state; nil when its directory is gone, Unknown for a value that is no state.
    public func backendState() throws -> XenbusState? {
        guard let value = try store.read("\(backendPath)/state") else { return nil }
        return XenbusState(node: value) ?? .unknown
    }

    /// The backend's `online` node: 0 means the toolstack is taking the device away.
    func backendOnline() -> Bool { ((try? store.read("\(backendPath)/online")) ?? nil) != "0" }

    public func frontendState() throws -> XenbusState? { try store.read("\(frontendPath)/state").flatMap { XenbusState(node: $0) } }

    func switchState(_ state: XenbusState) throws {
        try store.write("\(frontendPath)/state", "\(state.rawValue)")
    }

    /// Readable when the backend's state may have changed; call `takeStateEvents()` then.
    public var watchDescriptor: Int32 { store.watchDescriptor }

    /// Drains queued watch events; true if the backend's state node fired.
    public func takeStateEvents() -> Bool { store.pendingWatchEvents().contains { $0.token == watchToken } }

    /// The reason xenbus_dev_fatal left in the backend's error node, if the guest may read it.
    public func backendError() -> String? {
        guard let range = backendPath.range(of: "/backend/") else { return nil }
        let home = backendPath[..<range.lowerBound]
        return (try? store.read("\(home)/error\(backendPath[range.lowerBound...])/error")) ?? nil
    }

    /// Waits (on the watch) until the backend's state passes `accept`; nil state = directory
    /// gone. Throws on timeout, or at once when `fail` says so.
    @discardableResult
    func waitForBackend(_ what: String, timeout: TimeInterval? = nil,
                        fail: (XenbusState?) -> Bool = { _ in false },
                        until accept: (XenbusState?) -> Bool) throws -> XenbusState? {
        let deadline = Date().addingTimeInterval(timeout ?? options.timeout)
        while true {
            let state = try backendState()
            if accept(state) { return state }
            if fail(state) {
                let reason = backendError().map { ": \($0)" } ?? ""
                throw FrontendFailure("backend \(backendPath) went \(state?.description ?? "away") while waiting for \(what)\(reason)")
            }
            let remaining = deadline.timeIntervalSinceNow
            if remaining <= 0 {
                throw FrontendFailure("backend \(backendPath) did not reach \(what) within \(Int(timeout ?? options.timeout)) s (it is \(state?.description ?? "gone")); is blkback-server running?")
            }
            _ = store.waitForWatchEvents(timeoutMilliseconds: Int32(min(remaining, 0.5) * 1000) + 1)
        }
    }

    // MARK: connecting

    /// Brings the device to Connected: resets a half-open device a previous frontend left
    /// behind, waits for InitWait, sets up the rings and publishes them, waits for the
    /// backend's Connected, reads the disk, goes Connected.
    @discardableResult
    public func connect() throws -> NegotiatedDevice {
        try resetLeftoverSession()
        try waitForBackend("InitWait", fail: { $0 == nil || $0 == .closing }) { $0 == .initWait }
        do {
            try talkToBlkback()
            try waitForBackend("Connected", fail: { $0 == nil || $0 == .closing || $0 == .closed }) { $0 == .connected }
            let device = try readDisk()
            try switchState(.connected)
            negotiated = device
            return device
        } catch {
            releaseRings()
            try? switchState(.closed)
            throw error
        }
    }

    /// A frontend that died left its state behind: close the device the blkfront way, then
    /// ask the backend to start over (Initialising while it is Closed means "reconnect").
    private func resetLeftoverSession() throws {
        guard let backend = try backendState() else {
            throw FrontendFailure("backend \(backendPath) does not exist; is the device attached (xensim attach)?")
        }
        let frontend = try frontendState() ?? .initialising
        if [.initialised, .connected, .closing].contains(frontend) || [.connected, .closing].contains(backend) {
            try switchState(.closing)
            _ = try? waitForBackend("Closing", timeout: 2) { $0 == nil || $0 == .closing || $0 == .closed }
            try switchState(.closed)
            try waitForBackend("Closed", fail: { $0 == nil }) { $0 == .closed || $0 == .initWait }
        } else if frontend == .initialising && backend != .closed {
            return
        }
        if try backendState() != .initWait { try switchState(.initialising) }
    }

    /// talk_to_blkback: clamp to the backend's offers, set up every queue, write the keys in
    /// one transaction (again when it conflicts), then Initialised.
    private func talkToBlkback() throws {
        let maxQueues = try backendUnsigned("multi-queue-max-queues", default: 1)
        let maxOrder = try backendUnsigned("max-ring-page-order", default: 0)
        let queueCount = max(1, min(options.queues, Int(clamping: maxQueues)))
        let order = min(options.ringPageOrder, Int(clamping: maxOrder), 4)
        releaseRings()
        for index in 0..<queueCount {
            queues.append(try BlockfrontQueue(index: index, pageOrder: order, protocol: options.protocol,
                                              backend: backendId, pages: pages, eventChannels: eventChannels))
        }
        let description = RingDescription(protocol: options.protocol, ringPageOrder: order,
                                          queues: queues.map(\.ringQueue), persistentGrants: options.persistentGrants)
        try store.transaction { tx in
            // Keys of an earlier session with another shape would mislead the backend.
            for name in try store.directory(frontendPath, transaction: tx) ?? [] where RingDescription.isRingKey(name) {
                try store.remove("\(frontendPath)/\(name)", transaction: tx)
            }
            for (key, value) in description.keys { try store.write("\(frontendPath)/\(key)", value, transaction: tx) }
        }
        try switchState(.initialised)
    }

    /// blkfront_connect's reads: sectors, info, sector-size are required; the rest are hints.
    private func readDisk() throws -> NegotiatedDevice {
        let sectors = try requiredBackendUnsigned("sectors")
        let info = try requiredBackendUnsigned("info")
        let sectorSize = try requiredBackendUnsigned("sector-size")
        guard sectorSize >= 512, sectorSize <= 65536, sectorSize & (sectorSize - 1) == 0 else {
            throw FrontendFailure("backend wrote sector-size \(sectorSize); it must be a power of two from 512 to 65536")
        }
        let physical = try backendUnsigned("physical-sector-size", default: sectorSize)
        let backendIndirect = try backendUnsigned("feature-max-indirect-segments", default: 0)
        // blkfront_gather_backend_features: at most our own limit, and none unless it beats
        // the 11 direct segments.
        var indirect = options.indirect ? min(Int(clamping: backendIndirect), options.maxIndirectSegments, Blkif.maxIndirectSegments) : 0
        if indirect <= Blkif.maxSegmentsPerRequest { indirect = 0 }
        let features = NegotiatedDevice.Features(
            flush: try backendUnsigned("feature-flush-cache", default: 0) != 0,
            barrier: try backendUnsigned("feature-barrier", default: 0) != 0,
            discard: try backendUnsigned("feature-discard", default: 0) != 0,
            persistent: try backendUnsigned("feature-persistent", default: 0) != 0)
        return NegotiatedDevice(
            backendPath: backendPath, backendId: backendId, protocol: options.protocol.xenstoreValue,
            queues: queues.count, ringPageOrder: queues.first.map { $0.ringPages.count.trailingZeroBitCount } ?? 0,
            ringSize: queues.first?.ring.shared.size ?? 0, persistentGrants: options.persistentGrants && features.persistent,
            indirectSegments: indirect,
            sectors: sectors, sectorSize: Int(sectorSize), physicalSectorSize: Int(physical),
            info: UInt32(truncatingIfNeeded: info), readOnly: info & 4 != 0, features: features)
    }

    private func backendUnsigned(_ key: String, default fallback: UInt64) throws -> UInt64 {
        guard let text = try store.read("\(backendPath)/\(key)") else { return fallback }
        guard let value = UInt64(text.trimmingCharacters(in: .whitespaces)) else {
            throw FrontendFailure("backend wrote \(key)='\(text.prefix(32))', not a number")
        }
        return value
    }

    /// The backend's `sectors` now (read again after an online resize).
    func backendSectors() throws -> UInt64 { try requiredBackendUnsigned("sectors") }

    private func requiredBackendUnsigned(_ key: String) throws -> UInt64 {
        guard try store.read("\(backendPath)/\(key)") != nil else {
            throw FrontendFailure("backend \(backendPath) is Connected but wrote no \(key)")
        }
        return try backendUnsigned(key, default: 0)
    }

    // MARK: closing

    /// The rings' grants ended (pages the backend still maps kept aside) and the event
    /// channels closed.
    func releaseRings() {
        for queue in queues { queue.release(pages: pages, eventChannels: eventChannels) }
        queues = []
        negotiated = nil
    }

    /// blkfront_closing for a backend that went Closing on its own: Closed at once.
    func acknowledgeBackendClosing() throws {
        try switchState(.closed)
    }

    /// Closing the device from the guest's side (blkfront_remove / xenbus_frontend_closed):
    /// Closing, wait for the backend to follow, Closed, wait for its Closed (bounded), then
    /// take every grant back. Returns grants still mapped by the backend.
    @discardableResult
    public func close() -> Int {
        // Already Closed (the backend closed first), or the toolstack removed our directory:
        // nothing to say, and writing would recreate nodes of a removed device.
        let present = ((try? store.read("\(frontendPath)/backend")) ?? nil) != nil
        if present, ((try? frontendState()) ?? nil) != .closed {
            try? switchState(.closing)
            _ = try? waitForBackend("Closing") { $0 == nil || $0 == .closing || $0 == .closed }
            try? switchState(.closed)
            _ = try? waitForBackend("Closed") { $0 == nil || $0 == .closed || $0 == .initWait }
        }
        releaseRings()
        return pages.retryBusy()
    }
}
