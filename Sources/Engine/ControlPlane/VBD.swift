import Blkif
import Foundation
import Glibc
import Logging
import VBDInterface
import Xenbus

/// What every VBD shares: the xenstore connection, the configuration and the data plane.
struct ControlPlaneContext {
    let store: XenStore
    let configuration: BackendConfiguration
    let dataPlane: (any DataPlane)?
    let logger: Logger
}

/// The watch tokens the control plane registers; the token routes an event to its handler.
enum WatchToken: Equatable, Hashable {
    /// backend/<kind>: device directories appearing and going.
    case backendTree(kind: String)
    /// <frontend>/state of the VBD at this backend path.
    case frontendState(backendPath: String)
    /// <backend>/physical-device, written by the hotplug script.
    case physicalDevice(backendPath: String)

    var text: String {
        switch self {
        case .backendTree(let kind): "backend:" + kind
        case .frontendState(let path): "frontend-state:" + path
        case .physicalDevice(let path): "physical-device:" + path
        }
    }

    init?(_ text: String) {
        guard let colon = text.firstIndex(of: ":") else { return nil }
        let value = String(text[text.index(after: colon)...])
        switch text[..<colon] {
        case "backend": self = .backendTree(kind: value)
        case "frontend-state": self = .frontendState(backendPath: value)
        case "physical-device": self = .physicalDevice(backendPath: value)
        default: return nil
        }
    }
}

/// One virtual block device this backend serves: backend/<kind>/<domid>/<devid>. Its state
/// lives only here; the control-plane thread alone touches it (xen-blkback's backend_info).
/// A xenbus_dev_fatal report: errno and the line for the error node.
struct XenbusFailure: Error {
    let errno: Int32
    let message: String
}

final class VBD {
    enum Outcome { case keep, unregister }

    let kind: String
    let domid: UInt32
    let devid: UInt32
    let backendPath: String
    private let context: ControlPlaneContext
    private var logger: Logger

    private(set) var frontendPath = ""
    private(set) var backendState: XenbusState = .initialising
    private var frontendState: FrontendStateReading = .unknown
    private var mode = ""
    private var requestedTarget = ""
    private var backingStore: BackingStore?
    private var info: VDiskInfo = []
    private var rings: RingDescription?
    private var connection: (any ConnectedRings)?
    /// A disconnect found requests in flight; the manager calls `retryDisconnect` later.
    private(set) var disconnectPending = false
    private var features = BlockFeatures.none
    private var lastError: String?
    private var watches: [(path: String, token: WatchToken)] = []

    init(kind: String, domid: UInt32, devid: UInt32, context: ControlPlaneContext) {
        self.kind = kind
        self.domid = domid
        self.devid = devid
        self.context = context
        backendPath = "\(context.configuration.backendRoot(kind: kind))/\(domid)/\(devid)"
        logger = context.logger
        logger[metadataKey: "vbd"] = "\(kind)/\(domid)/\(devid)"
    }

    private var store: XenStore { context.store }
    /// The xenbus nodename (relative to our domain), as the kernel names the device.
    private var nodename: String { "backend/\(kind)/\(domid)/\(devid)" }

    private func backend(_ key: String) throws -> String? { try store.read(backendPath + "/" + key) }

    // MARK: probe (xen_blkbk_probe plus xenbus's talk_to_otherend)

    /// Reads the toolstack's keys, advertises our limits, opens a params file when no
    /// hotplug script will run, switches to InitWait and starts watching.
    func probe() {
        do {
            try readOtherEnd()
            try publishProbeFeatures()
            try watch(backendPath + "/physical-device", .physicalDevice(backendPath: backendPath))
            mode = try backend("mode") ?? ""
            // No hotplug script will write physical-device: open params now, so a missing
            // file is reported before InitWait and the toolstack's wait fails fast.
            if try backend("script") == nil, try backend("physical-device") == nil, let params = try backend("params") {
                requestedTarget = params
                guard openBackingStore(try BackingSource.params(params)) else { return }
            }
            // What the frontend says now, before the watch fires with it (see frontendStateChanged).
            frontendState = FrontendStateReading(node: try store.read(frontendPath + "/state"))
            try switchState(.initWait)
            try watch(frontendPath + "/state", .frontendState(backendPath: backendPath))
            logger.info("probed: frontend \(frontendPath), waiting for the frontend\(backingStore == nil ? " and physical-device" : "")")
        } catch let error as XenbusFailure {
            fatal(error.errno, error.message)
        } catch let error as BackingStoreError {
            fatal(error.errno, "creating vbd structure: \(error.message)")
        } catch let error as XenStoreError {
            fatal(error.errno, "probing: \(error)")
        } catch {
            fatal(EINVAL, "probing: \(error)")
        }
    }

    /// read_otherend_details: `frontend` must name an existing directory and `frontend-id`
    /// must be the domain in our path.
    private func readOtherEnd() throws {
        let frontend = try backend("frontend") ?? ""
        let frontendID = try backend("frontend-id").flatMap { UInt32($0.trimmingCharacters(in: .whitespaces)) }
        guard frontend.hasPrefix("/"), frontend.utf8.count < 3072, try store.directory(frontend) != nil else {
            throw XenbusFailure(errno: ENOENT, message: "unable to read other end from \(nodename).  missing or inaccessible.")
        }
        guard frontendID == domid else {
            throw XenbusFailure(errno: EINVAL, message: "frontend-id \(frontendID.map(String.init) ?? "missing") does not match domain \(domid) of \(nodename)")
        }
        frontendPath = frontend
    }

    private func publishProbeFeatures() throws {
        let configuration = context.configuration
        try store.transaction { transaction in
            // A directory the toolstack removed meanwhile is not recreated.
            guard try store.read(backendPath + "/state", transaction: transaction) != nil else { return }
            if configuration.maxIndirectSegments > 0 {
                try store.write(backendPath + "/feature-max-indirect-segments", "\(configuration.maxIndirectSegments)", transaction: transaction)
            }
            try store.write(backendPath + "/multi-queue-max-queues", "\(configuration.maxQueues)", transaction: transaction)
            try store.write(backendPath + "/max-ring-page-order", "\(configuration.maxRingPageOrder)", transaction: transaction)
        }
    }

    private func watch(_ path: String, _ token: WatchToken) throws {
        try store.watch(path, token: token.text)
        watches.append((path, token))
    }

    // MARK: backing store (backend_changed)

    /// physical-device was written (or the watch fired at registration).
    func physicalDeviceChanged() {
        do {
            // Missing: the watch fired at registration before the hotplug script ran.
            guard let value = try backend("physical-device") else { return }
            guard let number = DeviceNumber(physicalDevice: value) else {
                fatal(EINVAL, "reading physical-device: '\(XenbusValue.sanitized(value))' is not major:minor")
                return
            }
            if let open = backingStore {
                if open.deviceNumber != number {
                    logger.warning("changing physical device (from \(open.deviceNumber?.description ?? open.path) to \(number)) not supported")
                }
                return
            }
            guard let mode = try backend("mode") else {
                fatal(ENOENT, "reading mode")
                return
            }
            self.mode = mode
            requestedTarget = "physical-device \(number)"
            guard openBackingStore(.device(number, pathHint: try backend("physical-device-path"))) else { return }
            tryConnect()
        } catch {
            logger.warning("reading physical-device failed: \(error)")
        }
    }

    /// Opens the store with the access `mode` grants; a failure is fatal for this device only.
    private func openBackingStore(_ source: BackingSource) -> Bool {
        do {
            let store = try BackingStore.open(source, readOnly: !mode.contains("w"))
            backingStore = store
            info = try vdiskInfo(readOnly: store.readOnly)
            logger.info("opened \(store.path) (\(store.sectors) sectors of 512 bytes, sector size \(store.logicalSectorSize), \(store.readOnly ? "read-only" : "read-write"))")
            return true
        } catch let error as BackingStoreError {
            fatal(error.errno, "creating vbd structure: \(error.message)")
        } catch {
            fatal(EIO, "creating vbd structure: \(error)")
        }
        return false
    }

    /// device-type=cdrom (the kernel reads the frontend's; libxl writes it on both sides),
    /// removable=1, read-only mode.
    private func vdiskInfo(readOnly: Bool) throws -> VDiskInfo {
        var info: VDiskInfo = readOnly ? .readOnly : []
        let frontendType = frontendPath.isEmpty ? nil : try store.read(frontendPath + "/device-type")
        if try backend("device-type") == "cdrom" || frontendType == "cdrom" { info.insert(.cdrom) }
        if try backend("removable")?.trimmingCharacters(in: .whitespaces) == "1" { info.insert(.removable) }
        return info
    }

    // MARK: frontend state (frontend_changed)

    func frontendStateChanged() -> Outcome {
        do {
            let reading = FrontendStateReading(node: try store.read(frontendPath + "/state"))
            if reading != frontendState {
                logger.info("frontend \(frontendState) → \(reading) (backend \(backendState))")
            } else if reading.state == .closed, backendState == .initWait {
                // A frontend that was already Closed when we offered the device (a guest
                // waiting across a daemon restart) is not a new close: keep offering it;
                // blkfront connects from Closed when it sees InitWait.
                return .keep
            }
            frontendState = reading
            let online = try backend("online").flatMap { Int($0.trimmingCharacters(in: .whitespaces)) } ?? 0 != 0
            let actions = frontendChanged(backend: backendState, frontend: reading, online: online)
            for action in actions {
                switch action {
                case .switchState(let state):
                    try switchState(state)
                case .disconnect:
                    // Connecting over rings still in use would leak them (XSA-350).
                    if !disconnect(), actions.contains(.connect) {
                        fatal(EBUSY, "pending I/O")
                        return .keep
                    }
                case .connect:
                    connectRing()
                case .unregister:
                    return .unregister
                case .fatal(let errno, let message):
                    fatal(errno, message)
                }
            }
        } catch {
            logger.warning("handling the frontend state failed: \(error)")
        }
        return .keep
    }

    /// connect_ring: read and validate the frontend's ring description.
    private func connectRing() {
        do {
            let description = try RingDescription.read(limits: context.configuration.ringLimits) { key in
                try store.read(frontendPath + "/" + key)
            }
            rings = description
            logger.info("using \(description.queues.count) queues, protocol \(description.protocol), ring page order \(description.ringPageOrder)")
            tryConnect()
        } catch let error as RingDescriptionError {
            fatal(error.errno, error.message)
        } catch let error as XenStoreError {
            fatal(error.errno, "reading the ring description: \(error)")
        } catch {
            fatal(EINVAL, "reading the ring description: \(error)")
        }
    }

    /// xen_update_blkif_status: connect once both the rings and the backing store are there.
    private func tryConnect() {
        guard backendState != .connected, let rings, let backingStore else { return }
        guard let dataPlane = context.dataPlane else {
            logger.info("data plane not available; staying in InitWait")
            return
        }
        let request = DataPlaneRequest(kind: kind, domid: domid, devid: devid, backingStore: backingStore, rings: rings,
                                       maxIndirectSegments: context.configuration.maxIndirectSegments,
                                       discardEnabled: (try? backend("discard-enable")) ?? "1" != "0")
        let connected: any ConnectedRings
        do {
            connected = try dataPlane.connect(request)
        } catch {
            fatal(EIO, "mapping rings: \(error)")
            return
        }
        connection = connected
        features = connected.features
        do {
            try publishDisk(backingStore, features: connected.features)
            try switchState(.connected)
        } catch {
            fatal((error as? XenStoreError)?.errno ?? EIO, "publishing the disk: \(error)")
            _ = disconnect()
        }
    }

    /// connect(): what the frontend needs to know about the disk, in one transaction.
    private func publishDisk(_ disk: BackingStore, features: BlockFeatures) throws {
        var keys: [(String, String)] = [
            ("feature-flush-cache", features.flush ? "1" : "0"),
            ("feature-barrier", features.barrier ? "1" : "0"),
            ("feature-discard", features.discard ? "1" : "0"),
            // Only what the data plane really does, whatever the configuration offers.
            ("feature-persistent", features.persistentGrants ? "1" : "0"),
            ("sectors", "\(disk.sectors)"),
            ("info", "\(info.rawValue)"),
            ("sector-size", "\(disk.logicalSectorSize)"),
            ("physical-sector-size", "\(disk.physicalSectorSize)"),
        ]
        if features.discard {
            keys += [("discard-granularity", "\(features.discardGranularity)"),
                     ("discard-alignment", "\(features.discardAlignment)"),
                     ("discard-secure", features.discardSecure ? "1" : "0")]
        }
        try store.transaction { transaction in
            guard try store.read(backendPath + "/state", transaction: transaction) != nil else { return }
            for (key, value) in keys { try store.write(backendPath + "/" + key, value, transaction: transaction) }
        }
    }

    // MARK: operator commands

    /// An operator's state command (see VBDStateCommand). Throws `.conflict` with one line
    /// when the current state forbids it; nothing changes then.
    func perform(_ command: VBDStateCommand) throws(VBDCommandError) {
        do {
            switch command {
            case .closing:
                guard [.initWait, .initialised, .connected].contains(backendState) else {
                    throw VBDCommandError.conflict("backend of \(nodename) is \(backendState); closing applies to InitWait, Initialised or Connected")
                }
                // The frontend's Closed then reaches frontendChanged: disconnect, Closed.
                try switchState(.closing)
                logger.info("operator: closing")
            case .closed:
                guard backendState != .closed else {
                    throw VBDCommandError.conflict("backend of \(nodename) is already Closed")
                }
                // Busy rings are released by the manager's drain retries.
                _ = disconnect()
                try switchState(.closed)
                logger.info("operator: closed")
            case .reconnect:
                guard try backend("online").flatMap({ Int($0.trimmingCharacters(in: .whitespaces)) }) ?? 0 != 0 else {
                    throw VBDCommandError.conflict("\(nodename) is being removed (online=0); it cannot reconnect")
                }
                guard backendState == .closed || backendState == .closing else {
                    throw VBDCommandError.conflict("backend of \(nodename) is \(backendState); reconnect applies to a Closed or Closing device")
                }
                guard connection == nil, !disconnectPending else {
                    throw VBDCommandError.conflict("\(nodename) still has I/O in flight on its rings; retry once it drained")
                }
                // A frontend still holding its session would answer our InitWait with a
                // late Closed and close the device again.
                let frontend = FrontendStateReading(node: try store.read(frontendPath + "/state"))
                guard let state = frontend.state, [.initialising, .initWait, .closed].contains(state) else {
                    throw VBDCommandError.conflict("frontend of \(nodename) is \(frontend); reconnect once it has closed")
                }
                frontendState = frontend
                rings = nil
                lastError = nil
                try switchState(.initWait)
                logger.info("operator: reconnect; waiting for the frontend")
            }
        } catch let error as VBDCommandError {
            throw error
        } catch {
            logger.warning("operator \(command) failed: \(error)")
            throw VBDCommandError.conflict("\(command) on \(nodename) failed: \(error)")
        }
    }

    // MARK: teardown

    /// xen_blkif_disconnect: true when nothing is mapped any more.
    private func disconnect() -> Bool {
        rings = nil
        guard let connection else { disconnectPending = false; return true }
        if connection.disconnect() {
            self.connection = nil
            features = .none
            disconnectPending = false
            return true
        }
        logger.info("requests still in flight; disconnecting later")
        disconnectPending = true
        return false
    }

    func retryDisconnect() { _ = disconnect() }

    enum StopReason { case removed, unregistered, shutdown }

    /// Rings that still had requests in flight when the device stopped, and what to do once
    /// they are released.
    struct PendingRelease {
        let backendPath: String
        let rings: any ConnectedRings
        let afterwards: () -> Void

        /// True (and `afterwards` done) once the rings are released.
        func retry() -> Bool {
            guard rings.disconnect() else { return false }
            afterwards()
            return true
        }
    }

    /// xen_blkbk_remove: stop watching and serving, close the backing store. After
    /// `unregistered` the backend is left Closed like xenbus_dev_remove leaves it; a removed
    /// directory gets no writes; at daemon shutdown only connected devices are closed, the
    /// others stay for the next instance to adopt. Closed is written only once the rings are
    /// released (xen_blkif_disconnect comes first), so a frontend that sees Closed can take
    /// its grants back; rings still busy are returned for the caller to drain.
    func stop(_ reason: StopReason) -> PendingRelease? {
        let wasConnected = backendState == .connected
        for (path, token) in watches { try? store.unwatch(path, token: token.text) }
        watches.removeAll()
        let busy = disconnect() ? nil : connection
        connection = nil
        backingStore = nil
        let afterwards: () -> Void
        switch reason {
        case .removed:
            logger.info("backend directory removed; device forgotten")
            afterwards = {}
        case .unregistered:
            afterwards = { [self] in
                try? switchState(.closed)
                logger.info("device unregistered")
            }
        case .shutdown:
            afterwards = { [self] in if wasConnected { try? switchState(.closed) } }
        }
        guard let busy else {
            afterwards()
            return nil
        }
        return PendingRelease(backendPath: backendPath, rings: busy, afterwards: afterwards)
    }

    // MARK: xenbus helpers

    /// xenbus_switch_state: write only a change, and never into a directory that is gone.
    private func switchState(_ state: XenbusState) throws {
        guard state != backendState else { return }
        try store.transaction { transaction in
            guard let current = try store.read(backendPath + "/state", transaction: transaction) else { return }
            if XenbusState(node: current) != state {
                try store.write(backendPath + "/state", "\(state.rawValue)", transaction: transaction)
            }
        }
        logger.debug("backend \(backendState) → \(state)")
        backendState = state
    }

    /// xenbus_dev_fatal: log, write "<errno> <message>" to error/<nodename>/error in our
    /// domain's tree, and switch to Closing. The daemon carries on with every other device.
    private func fatal(_ errno: Int32, _ message: String) {
        let line = "\(errno) \(message)"
        lastError = line
        logger.error("\(line)")
        do {
            try store.write("\(context.configuration.domainPath)/error/\(nodename)/error", line)
            try switchState(.closing)
        } catch {
            logger.warning("reporting the error failed: \(error)")
        }
    }

    /// The rings while the data plane serves them (their counters are safe to read anywhere).
    var connectedRings: (any ConnectedRings)? { connection }

    var snapshot: VBDSnapshot {
        let description = rings
        return VBDSnapshot(kind: kind, domid: domid, devid: devid, backendPath: backendPath, frontendPath: frontendPath,
                           backendState: backendState, frontendState: frontendState.state,
                           mode: mode.contains("w") ? "w" : "r", target: backingStore?.path ?? requestedTarget,
                           sectors: backingStore?.sectors ?? 0, sectorSize: backingStore?.logicalSectorSize ?? 0,
                           physicalSectorSize: backingStore?.physicalSectorSize ?? 0, info: info,
                           protocol: description?.protocol.description, queues: description?.queues.count ?? 0,
                           ringPageOrder: description?.ringPageOrder ?? 0,
                           persistentGrants: (description?.persistentGrants ?? false) && features.persistentGrants,
                           maxIndirectSegments: context.configuration.maxIndirectSegments,
                           features: features, statistics: connection?.statistics, error: lastError)
    }
}
