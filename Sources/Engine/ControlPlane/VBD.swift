import Blkif
import Foundation
import Glibc
import Logging
import VBDInterface
import Xenbus

/// One virtual block device this backend serves: backend/<kind>/<domid>/<devid>. Its state
/// lives only here; the control-plane thread alone touches it (xen-blkback's backend_info).
/// The protocol steps live in extensions by concern: probe and backing store
/// (VBD+Probe.swift), the frontend's states and connect (VBD+Frontend.swift), operator
/// commands (VBD+Operator.swift), teardown (VBD+Teardown.swift).
final class VBD {
    enum Outcome { case keep, unregister }

    /// The disk: what the toolstack asked for and what was opened.
    struct Disk {
        /// nil until the backend's `mode` key was read.
        var mode: AccessMode?
        var requestedTarget = ""
        /// Set with `prepared` once opened (StoreOpenings).
        var store: BackingStore?
        /// The data plane's findings on `store` (DataPlane.prepare), kept across connects.
        var prepared: (any PreparedStore)?
        /// The opening under way (its ticket) and what follows it.
        var opening: (ticket: UInt64, then: AfterOpening)?
        var info: VDiskInfo = []
        /// The size served, in 512-byte sectors: the store's at open, then its size at the
        /// last resize.
        var sectors: UInt64 = 0
    }

    /// The rings: the frontend's description and the data plane's hold on them.
    struct Rings {
        var description: RingDescription?
        var connection: (any ConnectedRings)?
        /// A disconnect found requests in flight; the manager calls `retryDisconnect` later.
        var disconnectPending = false
        /// Closed is owed once that disconnect succeeds: a frontend that sees Closed takes
        /// its pages back, so it must not see it while any of them is still mapped.
        var closeWhenReleased = false
        /// After that Closed, the frontend's state is looked at again (it closed first).
        var followFrontendAfterClose = false
        var features = BlockFeatures.none
    }

    let identity: VBDIdentity
    let backendPath: String
    let context: ControlPlaneContext
    var logger: Logger

    // xenbus: both ends' states and what this device watches.
    var frontendPath = ""
    var backendState: XenbusState = .initialising
    var frontendState: FrontendStateReading = .unknown
    var lastError: String?
    /// The QoS limits last read from the backend's keys or set by an operator.
    var qos = QoSLimits.none
    var watches: [(path: String, token: WatchToken)] = []
    /// A halted ring of the current connection was written to the error node.
    var haltReported = false
    /// The frontend's state changes are logged at most 20 times in 10 s.
    var frontendLogBudget = LogLineBudget(limit: 20, windowSeconds: 10)

    var disk = Disk()
    var rings = Rings()

    init(_ identity: VBDIdentity, context: ControlPlaneContext) {
        self.identity = identity
        self.context = context
        backendPath = context.configuration.backendPath(identity)
        logger = context.logger
        logger[metadataKey: "vbd"] = "\(identity)"
    }

    var store: XenStore { context.store }
    /// The xenbus nodename (relative to our domain), as the kernel names the device.
    var nodename: String { "backend/\(identity)" }
    var disconnectPending: Bool { rings.disconnectPending }

    func backend(_ key: String) throws -> String? { try store.read(backendPath + "/" + key) }

    /// The toolstack removes a device whose rings were never connected (online=0, and it
    /// wrote Closing into our state): no frontend will answer it.
    func toolstackClosesUnconnected() throws -> Bool {
        guard rings.connection == nil, !rings.disconnectPending, backendState == .initWait || backendState == .initialising else {
            return false
        }
        return try XenbusState(node: backend("state")) == .closing && !isOnline()
    }

    /// The backend's `online` (0 once the toolstack wants the device gone).
    func isOnline() throws -> Bool { XenbusValue.flag(try backend("online"), default: false) }

    // MARK: xenbus helpers

    /// xenbus_switch_state: write only a change, and never into a directory that is gone.
    func switchState(_ state: XenbusState) throws {
        guard state != backendState else { return }
        try store.transaction { transaction in
            guard let current = try store.read(backendPath + "/state", transaction: transaction) else { return }
            if XenbusState(node: current) != state {
                try store.write(backendPath + "/state", "\(state.rawValue)", transaction: transaction)
            }
        }
        logger.debug("backend \(backendState) → \(state)")
        context.events.publish(.backendState, identity, [("state", .text(state.description)), ("previous", .text(backendState.description))])
        backendState = state
    }

    /// xenbus_dev_fatal: log, write "<errno> <message>" to error/<nodename>/error in our
    /// domain's tree, and switch to Closing. The daemon carries on with every other device.
    func fatal(_ errno: Int32, _ message: String) {
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

    /// `fatal` for a thrown error: its own errno and line when it carries one (a
    /// XenbusFailure's line as is), else `fallback` and "<step>: <error>".
    func fatal(_ error: any Error, during step: String, fallback: Int32 = EINVAL) {
        switch error {
        case let failure as XenbusFailure: fatal(failure.errno, failure.message)
        case let known as any ErrnoCarrying: fatal(known.errno, "\(step): \(known)")
        default: fatal(fallback, "\(step): \(error)")
        }
    }

    /// Connected with its rings served.
    var isServing: Bool { backendState == .connected && rings.connection != nil }

    /// The rings while the data plane serves them (their counters are safe to read anywhere).
    var connectedRings: (any ConnectedRings)? { rings.connection }

    var snapshot: VBDSnapshot {
        let description = rings.description
        return VBDSnapshot(identity: identity, backendPath: backendPath, frontendPath: frontendPath,
                           backendState: backendState, frontendState: frontendState.state,
                           mode: (disk.mode ?? .read).rawValue, target: disk.store?.path ?? disk.requestedTarget,
                           sectors: disk.store == nil ? 0 : disk.sectors, sectorSize: disk.store?.logicalSectorSize ?? 0,
                           physicalSectorSize: disk.store?.physicalSectorSize ?? 0, info: disk.info,
                           protocol: description?.protocol.description, queues: description?.queues.count ?? 0,
                           ringPageOrder: description?.ringPageOrder ?? 0,
                           persistentGrants: (description?.persistentGrants ?? false) && rings.features.persistentGrants,
                           maxIndirectSegments: context.configuration.maxIndirectSegments,
                           features: rings.features, ioMode: rings.connection?.ioMode,
                           qos: rings.connection?.qos ?? qos, statistics: rings.connection?.statistics, error: lastError)
    }
}
