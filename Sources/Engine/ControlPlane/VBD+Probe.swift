import Blkif
import Foundation
import Glibc
import VBDInterface
import Xenbus

/// What follows the opening of a backing store.
enum AfterOpening {
    /// The rest of the probe: InitWait.
    case offer
    /// A connect, if the frontend waits for one.
    case connect
}

/// Probe (xen_blkbk_probe plus xenbus's talk_to_otherend) and the backing store
/// (backend_changed).
extension VBD {
    /// Reads the toolstack's keys, advertises our limits, opens a params file when no
    /// hotplug script will run, switches to InitWait and starts watching.
    func probe() {
        do {
            try readOtherEnd()
            try publishProbeFeatures()
            try watch(backendPath + "/physical-device", .physicalDevice(identity))
            disk.mode = AccessMode(xenstore: try backend("mode") ?? "")
            // No hotplug script will write physical-device (none runs, or the target is a
            // network store it leaves to us): open params now, and offer the device once it is
            // open, so a missing file is reported before InitWait and the toolstack's wait
            // fails fast.
            if try backend("physical-device") == nil, let params = try backend("params") {
                let network = switch try? BackingSource.params(params) {
                case .nbd?, .rbd?: true
                default: false
                }
                if try network || backend("script") == nil {
                    disk.requestedTarget = params
                    let source: BackingSource
                    do { source = try BackingSource.params(params) } catch { throw Self.creatingVBD(error) }
                    return startOpening(source, then: .offer)
                }
            }
            try offer()
        } catch {
            fatal(error, during: "probing")
        }
    }

    /// InitWait, and the frontend's state watched.
    private func offer() throws {
        let limits = ringLimits
        if limits.maxQueues < context.configuration.maxQueues {
            // An NBD server without multi-conn: a flush covers only its own connection.
            try store.write(backendPath + "/multi-queue-max-queues", "\(limits.maxQueues)")
        }
        // What the frontend says now, before the watch fires with it (see frontendStateChanged).
        frontendState = FrontendStateReading(node: try store.read(frontendPath + "/state"))
        try switchState(.initWait)
        try watch(frontendPath + "/state", .frontendState(identity))
        logger.info("probed: frontend \(frontendPath), waiting for the frontend\(disk.store == nil ? " and physical-device" : "")")
    }

    /// A device a previous daemon left Connected (a planned restart, or a crash): serve its
    /// rings again from their journals (`DataPlaneRequest.resume`), writing nothing the
    /// frontend would act on. What cannot be resumed — no journal, a journal for other rings,
    /// a frontend that changed its rings meanwhile — closes the device the normal way.
    func takeOver() {
        do {
            try readOtherEnd()
            disk.mode = AccessMode(xenstore: try backend("mode") ?? "")
            let source: BackingSource
            if let device = try backend("physical-device") {
                source = .device(try Self.deviceNumber(physicalDevice: device), pathHint: try backend("physical-device-path"))
            } else {
                let params = try backend("params") ?? ""
                do { source = try BackingSource.params(params) } catch { throw Self.creatingVBD(error) }
            }
            disk.requestedTarget = try backend("params") ?? ""
            // On this thread: the guest's I/O waits for the takeover, and it happens once.
            try adopt(try Self.open(source, readOnly: disk.mode != .write, configuration: context.configuration,
                                    dataPlane: context.dataPlane, identity: identity))
            guard let backingStore = disk.store else { return }
            backendState = .connected
            frontendState = FrontendStateReading(node: try store.read(frontendPath + "/state"))
            let description = try readRingDescription()
            guard let dataPlane = context.dataPlane, let prepared = disk.prepared else {
                throw XenbusFailure(errno: ENODEV, message: "no data plane to take the rings over")
            }
            var request = dataPlaneRequest(backingStore, prepared, description)
            request.resume = true
            let connected = try dataPlane.connect(request)
            rings.description = description
            rings.connection = connected
            rings.features = connected.features
            try watch(backendPath + "/physical-device", .physicalDevice(identity))
            try watch(frontendPath + "/state", .frontendState(identity))
            publishConnected(description, connected, backingStore)
            logger.info("took over the connected device: \(description.queues.count) queue(s), protocol \(description.protocol)")
        } catch {
            fatal(error, during: "taking over the connected device", fallback: EIO)
        }
    }

    /// read_otherend_details: `frontend` must name an existing directory and `frontend-id`
    /// must be the domain in our path.
    private func readOtherEnd() throws {
        let frontend = try backend("frontend") ?? ""
        let frontendID = try backend("frontend-id").flatMap(XenbusValue.unsigned)
        guard frontend.hasPrefix("/"), frontend.utf8.count < 3072, try store.directory(frontend) != nil else {
            throw XenbusFailure(errno: ENOENT, message: "unable to read other end from \(nodename).  missing or inaccessible.")
        }
        guard frontendID == UInt64(identity.domid.rawValue) else {
            throw XenbusFailure(errno: EINVAL, message: "frontend-id \(frontendID.map(String.init) ?? "missing") does not match domain \(identity.domid) of \(nodename)")
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

    /// physical-device was written (or the watch fired at registration).
    func physicalDeviceChanged() {
        do {
            // Missing: the watch fired at registration before the hotplug script ran.
            guard let value = try backend("physical-device") else { return }
            let number: DeviceNumber
            do { number = try Self.deviceNumber(physicalDevice: value) } catch {
                fatal(error, during: "reading physical-device")
                return
            }
            if let open = disk.store {
                if open.deviceNumber != number {
                    logger.warning("changing physical device (from \(open.deviceNumber?.description ?? open.path) to \(number)) not supported")
                }
                return
            }
            guard disk.opening == nil else { return }
            guard let mode = try backend("mode") else {
                fatal(ENOENT, "reading mode")
                return
            }
            disk.mode = AccessMode(xenstore: mode)
            disk.requestedTarget = "physical-device \(number)"
            startOpening(.device(number, pathHint: try backend("physical-device-path")), then: .connect)
        } catch {
            logger.warning("reading physical-device failed: \(error)")
        }
    }

    /// Opens the store with the access `mode` grants, and tries its I/O paths, off this
    /// thread; `opened` carries on with `next`.
    private func startOpening(_ source: BackingSource, then next: AfterOpening) {
        let readOnly = disk.mode != .write
        let dataPlane = context.dataPlane
        let configuration = context.configuration
        let identity = self.identity
        let ticket = context.openings.start(identity) {
            try Self.open(source, readOnly: readOnly, configuration: configuration, dataPlane: dataPlane, identity: identity)
        }
        disk.opening = (ticket, next)
    }

    /// The opening `ticket` finished: a failure is fatal for this device only.
    func opened(_ result: Result<OpenedStore, any Error>, ticket: UInt64) {
        guard let opening = disk.opening, opening.ticket == ticket else { return }
        disk.opening = nil
        do {
            try adopt(try result.get())
        } catch {
            return fatal(error, during: "creating vbd structure", fallback: EIO)
        }
        switch opening.then {
        case .offer:
            do { try offer() } catch { fatal(error, during: "probing") }
        case .connect:
            tryConnect()
        }
    }

    /// BackingStore.open and DataPlane.prepare: I/O on the store, which may take long.
    private static func open(_ source: BackingSource, readOnly: Bool, configuration: BackendConfiguration,
                             dataPlane: (any DataPlane)?, identity: VBDIdentity) throws -> OpenedStore {
        let store: BackingStore
        do {
            store = try BackingStore.open(source, readOnly: readOnly, connectTimeout: configuration.storeConnectTimeout,
                                          retryTimeout: configuration.storeRetryTimeout,
                                          previousLockHolder: dataPlane?.recordedLockHolder(of: identity))
        } catch {
            throw Self.creatingVBD(error)
        }
        return OpenedStore(store: store, prepared: try dataPlane?.prepare(store))
    }

    /// The device's store from now on.
    private func adopt(_ opened: OpenedStore) throws {
        let store = opened.store
        disk.store = store
        disk.prepared = opened.prepared
        disk.sectors = store.sectors
        disk.info = try vdiskInfo(readOnly: store.readOnly)
        logger.info("opened \(store.path) (\(store.sectors) sectors of 512 bytes, sector size \(store.logicalSectorSize), \(store.readOnly ? "read-only" : "read-write"))")
        if let broken = store.brokenLock {
            logger.notice("broke the exclusive lock of \(store.path) that \(broken), the client of the daemon that served this device before, still held")
        }
    }

    /// What this device's frontend may ask for: the daemon's limits, and one queue on an NBD
    /// export whose server does not promise consistency across connections (multi-conn).
    var ringLimits: RingLimits {
        var limits = context.configuration.ringLimits
        if case .nbd(let export) = disk.store?.medium, !export.info.canMultiConn { limits.maxQueues = 1 }
        return limits
    }

    /// physical-device as the hotplug script writes it (major:minor in hex).
    private static func deviceNumber(physicalDevice value: String) throws -> DeviceNumber {
        guard let number = DeviceNumber(physicalDevice: value) else {
            throw XenbusFailure(errno: EINVAL, message: "reading physical-device: '\(XenbusValue.sanitized(value))' is not major:minor")
        }
        return number
    }

    /// A backing store's refusal as xen_vbd_create reports it.
    private static func creatingVBD(_ error: BackingStoreError) -> XenbusFailure {
        XenbusFailure(errno: error.errno, message: "creating vbd structure: \(error.message)")
    }

    /// device-type=cdrom (the kernel reads the frontend's; libxl writes it on both sides),
    /// removable=1, read-only mode.
    private func vdiskInfo(readOnly: Bool) throws -> VDiskInfo {
        var info: VDiskInfo = readOnly ? .readOnly : []
        let frontendType = frontendPath.isEmpty ? nil : try store.read(frontendPath + "/device-type")
        if try backend("device-type") == "cdrom" || frontendType == "cdrom" { info.insert(.cdrom) }
        if XenbusValue.flag(try backend("removable"), default: false) { info.insert(.removable) }
        return info
    }
}
