import Blkif
import Foundation
import Hypervisor
import SimHypervisor
import Xenbus

/// The part of libxl that a block backend sees: it creates domains' xenstore trees, writes
/// the backend and frontend nodes of a disk with the keys and permissions libxl writes, waits
/// for the backend like libxl, plays the block hotplug script, and tears devices down the
/// way `xl block-detach` and `xl destroy` do.
public struct Toolstack {
    public struct Failure: Error, CustomStringConvertible {
        public let description: String
        init(_ description: String) { self.description = description }
    }

    /// What to attach: a disk as `xl block-attach` would describe it.
    public struct Disk {
        public var domid: UInt32
        public var devid: UInt32
        public var target: String
        public var writable: Bool = true
        public var kind: String = "vbd"
        public var cdrom: Bool = false

        public init(domid: UInt32, devid: UInt32, target: String, writable: Bool = true,
                    kind: String = "vbd", cdrom: Bool = false) {
            self.domid = domid
            self.devid = devid
            self.target = target
            self.writable = writable
            self.kind = kind
            self.cdrom = cdrom
        }
    }

    /// libxl's timeouts: LIBXL_INIT_TIMEOUT for a backend to reach InitWait, and
    /// LIBXL_DESTROY_TIMEOUT for it to close.
    public static let initTimeout: TimeInterval = 10
    public static let destroyTimeout: TimeInterval = 10

    let store: XenStore
    /// The simulated hypervisor whose domains this toolstack builds and destroys.
    let hypervisor: SimLayout
    let backendDomid: UInt32
    let log: (String) -> Void

    public init(store: XenStore, hypervisor: SimLayout, backendDomid: UInt32 = 0,
                log: @escaping (String) -> Void = { _ in }) {
        self.store = store
        self.hypervisor = hypervisor
        self.backendDomid = backendDomid
        self.log = log
    }

    static func domainPath(_ domid: UInt32) -> String { "/local/domain/\(domid)" }

    public func backendPath(kind: String, domid: UInt32, devid: UInt32) -> String {
        "\(Self.domainPath(backendDomid))/backend/\(kind)/\(domid)/\(devid)"
    }

    public static func frontendPath(kind: String, domid: UInt32, devid: UInt32) -> String {
        "\(domainPath(domid))/device/\(kind)/\(devid)"
    }

    // MARK: domains

    /// Builds the domain in the hypervisor (memory, grant table), then /local/domain/N (owned
    /// by N), and introduces it to xenstored, which fires @introduceDomain and opens the
    /// domain's own xenstore and event-channel sockets.
    public func createDomain(_ domid: UInt32, name: String, memoryMB: Int) throws {
        guard domid != 0, DomainID(rawValue: domid) != nil else { throw Failure("domid \(domid) is not a guest domain id (1..\(DomainID.largest))") }
        if store.isDomainIntroduced(domid) { throw Failure("domain \(domid) already exists; destroy it first") }
        do {
            try SimDomain.createDomain(directory: hypervisor.directory, domid: domid, memoryMB: memoryMB)
        } catch {
            throw Failure("cannot build domain \(domid): \(error)")
        }
        let path = Self.domainPath(domid)
        let owned = [XenStorePermission(domid: domid, access: .none)]
        try store.transaction { tx in
            try store.remove(path, transaction: tx)
            try store.mkdir(path, transaction: tx)
            try store.setPermissions(path, owned, transaction: tx)
            try store.write("\(path)/name", name, transaction: tx)
            try store.write("\(path)/domid", "\(domid)", transaction: tx)
            for child in ["device", "control", "data", "error", "drivers", "feature", "attr"] {
                try store.mkdir("\(path)/\(child)", transaction: tx)
                try store.setPermissions("\(path)/\(child)", owned, transaction: tx)
            }
        }
        try store.introduceDomain(domid, mfn: 0, eventChannel: 0)
    }

    /// What `xl destroy` does to a domain's disks and xenstore: every backend of the domain is
    /// told to go offline and close; after the timeout the nodes are removed regardless, then
    /// the domain is released (@releaseDomain) and its tree removed.
    public func destroyDomain(_ domid: UInt32) throws {
        guard store.isDomainIntroduced(domid) else { throw Failure("domain \(domid) does not exist") }
        let backendRoot = "\(Self.domainPath(backendDomid))/backend"
        var devices: [(kind: String, devid: UInt32)] = []
        for kind in try store.directory(backendRoot) ?? [] {
            for devid in try store.directory("\(backendRoot)/\(kind)/\(domid)") ?? [] {
                if let number = UInt32(devid) { devices.append((kind, number)) }
            }
        }
        // libxl's forced remove: the dead guest's frontend goes in the same transaction that
        // sets online=0 and Closing, so a backend sees frontend Unknown with Closing already
        // written, and its Closed cannot be overwritten by our Closing.
        try removeDevices(domid: domid, devices: devices, removingFrontends: true)
        try store.releaseDomain(domid)
        try store.remove(Self.domainPath(domid))
        for (kind, _) in devices { try store.remove("\(backendRoot)/\(kind)/\(domid)") }
        // The domain's pages go last, as Xen frees them only once nothing maps them.
        try? SimDomain.destroyDomain(directory: hypervisor.directory, domid: domid)
    }

    // MARK: disks

    /// `xl block-attach`: writes both device directories in one transaction, waits for the
    /// backend's InitWait, and for a block device plays the hotplug script.
    public func attach(_ disk: Disk) throws {
        // A missing or unopenable target is the backend's to report (its error node), as with libxl.
        var info = stat()
        let isBlockDevice = stat(disk.target, &info) == 0 && (info.st_mode & S_IFMT) == S_IFBLK
        let backend = backendPath(kind: disk.kind, domid: disk.domid, devid: disk.devid)
        let frontend = Self.frontendPath(kind: disk.kind, domid: disk.domid, devid: disk.devid)
        guard store.isDomainIntroduced(disk.domid) else {
            throw Failure("domain \(disk.domid) does not exist; create it first (xensim domain create)")
        }
        if try store.read("\(backend)/state") != nil {
            throw Failure("device \(disk.devid) of domain \(disk.domid) is already attached (\(backend))")
        }
        let backendPerms = [XenStorePermission(domid: backendDomid, access: .none),
                            XenStorePermission(domid: disk.domid, access: .read)]
        let frontendPerms = [XenStorePermission(domid: disk.domid, access: .none),
                             XenStorePermission(domid: backendDomid, access: .read)]
        let deviceType = disk.cdrom ? "cdrom" : "disk"
        var backendKeys: [(String, String)] = [
            ("frontend", frontend), ("frontend-id", "\(disk.domid)"), ("online", "1"),
            ("removable", disk.cdrom ? "1" : "0"), ("bootable", "1"), ("state", "\(XenbusState.initialising.rawValue)"),
            ("dev", Self.linuxName(devid: disk.devid) ?? "\(disk.devid)"), ("type", "phy"),
            ("mode", disk.writable ? "w" : "r"), ("device-type", deviceType),
            ("discard-enable", disk.cdrom ? "0" : "1"), ("specification", "xen"), ("params", disk.target),
        ]
        if isBlockDevice { backendKeys.append(("script", "/etc/xen/scripts/block")) }
        let frontendKeys: [(String, String)] = [
            ("backend", backend), ("backend-id", "\(backendDomid)"), ("state", "\(XenbusState.initialising.rawValue)"),
            ("virtual-device", "\(disk.devid)"), ("device-type", deviceType), ("trusted", "1"),
            ("protocol", "x86_64-abi"),
        ]
        try store.transaction { tx in
            try create(backend, keys: backendKeys, permissions: backendPerms, tx)
            try create(frontend, keys: frontendKeys, permissions: frontendPerms, tx)
        }

        // libxl waits for InitWait only; a backend that gave up (Closing or Closed) will not get
        // there, so stop waiting early and say why (the error node xenbus_dev_fatal wrote).
        let reached = try waitForBackendState(backend, timeout: Self.initTimeout) { $0 != .initialising }
        guard let reached else {
            throw Failure("unable to add device with path \(backend): no backend answered within \(Int(Self.initTimeout)) s; is blkback-server serving this kind?")
        }
        guard reached == .initWait || reached == .connected else {
            let reason = try store.read(errorPath(ofBackend: backend))
            throw Failure("unable to add device with path \(backend): the backend gave up (\(reached))" + (reason.map { ": \($0)" } ?? ""))
        }
        if isBlockDevice {
            // The block hotplug script's part: tell the backend which device to open.
            let major = (info.st_rdev >> 8) & 0xFFF, minor = (info.st_rdev & 0xFF) | ((info.st_rdev >> 12) & 0xFFF00)
            try store.transaction { tx in
                try store.write("\(backend)/physical-device", String(major, radix: 16) + ":" + String(minor, radix: 16), transaction: tx)
                try store.write("\(backend)/physical-device-path", disk.target, transaction: tx)
                try store.write("\(backend)/hotplug-status", "connected", transaction: tx)
            }
        }
    }

    /// `xl block-detach`: asks the backend to close, waits for Closed, removes both
    /// directories (anyway, with a warning, when nobody answers in time).
    public func detach(domid: UInt32, devid: UInt32, kind: String = "vbd") throws {
        let backend = backendPath(kind: kind, domid: domid, devid: devid)
        guard try store.read("\(backend)/state") != nil else {
            throw Failure("no device \(devid) attached to domain \(domid) (\(backend) does not exist)")
        }
        try removeDevices(domid: domid, devices: [(kind, devid)], removingFrontends: false)
    }

    /// libxl__initiate_device_generic_remove: online=0 and, unless the backend is Closed
    /// already, Closing, in one transaction (with the frontend removed in it too when the
    /// removal is forced); then a wait for Closed (at once when it is).
    private func removeDevices(domid: UInt32, devices: [(kind: String, devid: UInt32)], removingFrontends: Bool) throws {
        var pending: [String] = []
        for (kind, devid) in devices {
            let backend = backendPath(kind: kind, domid: domid, devid: devid)
            try store.transaction { tx in
                if removingFrontends { try store.remove(Self.frontendPath(kind: kind, domid: domid, devid: devid), transaction: tx) }
                guard let state = try store.read("\(backend)/state", transaction: tx) else { return }
                try store.write("\(backend)/online", "0", transaction: tx)
                if XenbusState(node: state) != .closed {
                    try store.write("\(backend)/state", "\(XenbusState.closing.rawValue)", transaction: tx)
                }
            }
            pending.append(backend)
        }
        for backend in pending {
            let closed = try waitForBackendState(backend, timeout: Self.destroyTimeout) { $0 == .closed }
            if closed == nil { log("warning: backend \(backend) did not close within \(Int(Self.destroyTimeout)) s; removing it anyway") }
            let frontend = try store.read("\(backend)/frontend")
            try store.transaction { tx in
                try store.remove(backend, transaction: tx)
                if let frontend { try store.remove(frontend, transaction: tx) }
            }
        }
    }

    private func create(_ path: String, keys: [(String, String)], permissions: [XenStorePermission],
                        _ tx: XenStoreTransaction) throws {
        try store.remove(path, transaction: tx)
        try store.mkdir(path, transaction: tx)
        try store.setPermissions(path, permissions, transaction: tx)
        for (key, value) in keys { try store.write("\(path)/\(key)", value, transaction: tx) }
    }

    /// Where xenbus_dev_fatal reports a backend's failure: error/backend/<kind>/<domid>/<devid>/error.
    func errorPath(ofBackend backend: String) -> String {
        let home = Self.domainPath(backendDomid)
        return "\(home)/error\(backend.dropFirst(home.count))/error"
    }

    /// Waits on a watch of the backend's state node for a state `accept` takes, and returns it;
    /// nil on timeout. A vanished backend directory counts as Closed.
    private func waitForBackendState(_ backend: String, timeout: TimeInterval,
                                     _ accept: (XenbusState) -> Bool) throws -> XenbusState? {
        let token = "toolstack-state"
        try store.watch("\(backend)/state", token: token)
        defer { try? store.unwatch("\(backend)/state", token: token) }
        let deadline = Date().addingTimeInterval(timeout)
        while true {
            let value = try store.read("\(backend)/state")
            guard let value else { return accept(.closed) ? .closed : nil }
            if let state = XenbusState(node: value), accept(state) { return state }
            let remaining = deadline.timeIntervalSinceNow
            if remaining <= 0 { return nil }
            _ = store.waitForWatchEvents(timeoutMilliseconds: Int32(min(remaining, 1) * 1000) + 1)
        }
    }

    /// Linux's name for a xen virtual-device number (xvda = 51712), as libxl writes `dev`.
    static func linuxName(devid: UInt32) -> String? {
        let letters = Array("abcdefghijklmnopqrstuvwxyz")
        let disk: UInt32
        if devid >> 8 == 202 { disk = (devid & 0xFF) >> 4 } // xvd major 202, 16 minors a disk
        else if devid & (1 << 28) != 0 { disk = (devid >> 8) & 0xFFFFF } // extended numbering
        else { return nil }
        var name = "", index = Int(disk)
        repeat {
            name = String(letters[index % 26]) + name
            index = index / 26 - 1
        } while index >= 0
        return "xvd" + name
    }
}
