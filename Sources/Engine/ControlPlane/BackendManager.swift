import Foundation
import Glibc
import Logging
import VBDInterface
import Xenbus

/// Serves the backend/<kind> trees of our domain: discovers VBDs the toolstack creates,
/// probes them, follows their frontends and tears them down (xenbus's backend bus plus
/// xen-blkback's xenbus.c). One control-plane thread runs an event loop over the xenstore
/// watch descriptor and a wakeup pipe; every VBD's state is owned by that thread.
public final class BackendManager: @unchecked Sendable {
    private let context: ControlPlaneContext
    /// What happens to the VBDs (GET /v1/events).
    public var events: VBDEventLog { context.events }
    private let wakeup: WakeupPipe
    private var logger: Logger { context.logger }
    private var configuration: BackendConfiguration { context.configuration }

    // Owned by the control-plane thread.
    private var devices: [VBDIdentity: VBD] = [:]
    /// Rings of forgotten devices that still had requests in flight.
    private var draining: [VBD.PendingRelease] = []

    // Shared with other threads, under `lock`.
    private let lock = NSLock()
    /// Each VBD's state as of the last loop turn, with its rings for live counters.
    private var published: [(snapshot: VBDSnapshot, rings: (any ConnectedRings)?)] = []
    private var stopRequested = false
    private var handOverAtStop = false
    private var lastSizeCheck: UInt64 = 0
    private var watching = false
    /// Operator commands waiting for the control-plane thread.
    private var commands: [PendingCommand] = []
    private let finished = DispatchSemaphore(value: 0)
    private var thread: Thread?

    /// How long to wait between retries of a disconnect that found requests in flight.
    private static let drainRetryMilliseconds: Int32 = 100
    /// At shutdown, how long in-flight requests may take before we stop waiting.
    private static let shutdownDrainSeconds = 8.0

    public init(configuration: BackendConfiguration, store: XenStore, dataPlane: (any DataPlane)?, logger: Logger,
                events: VBDEventLog = VBDEventLog()) throws {
        let wakeup = try WakeupPipe()
        self.wakeup = wakeup
        context = ControlPlaneContext(store: store, configuration: configuration, dataPlane: dataPlane, logger: logger,
                                      events: events, openings: StoreOpenings(wake: { wakeup.signal() }))
    }

    /// Registers the backend/<kind> watches (they fire at once, even for a tree that does
    /// not exist yet, which starts the first scan) and starts the control-plane thread.
    public func start() throws {
        for kind in configuration.kinds {
            try context.store.watch(configuration.backendRoot(kind: kind), token: WatchToken.backendTree(kind: kind).text)
        }
        let thread = Thread { [self] in
            nameCurrentThread("blkback-control")
            run()
            finished.signal()
        }
        // API threads already running read both under the lock (perform, stop, isWatching).
        lock.withLock {
            watching = true
            self.thread = thread
        }
        thread.start()
    }

    /// True once the backend trees are watched (for /healthz).
    public var isWatching: Bool { lock.withLock { watching } }

    /// Asks the control-plane thread to stop and waits for it: in-flight requests are
    /// answered (within a few seconds), watches removed, backing stores closed. Connected
    /// devices are closed, or with `handingOver` left Connected with their rings' journals,
    /// for the next daemon to take over (a planned restart).
    public func stop(handingOver: Bool = false) {
        let running = lock.withLock {
            let wasRunning = !stopRequested && thread != nil
            stopRequested = true
            handOverAtStop = handingOver
            return wasRunning
        }
        guard running else { return }
        wakeup.signal()
        finished.wait()
        // The thread's closure holds the manager: let go of it, or neither is ever freed.
        lock.withLock { thread = nil }
    }

    /// Copies of every VBD's state, ordered by kind, domid, devid; the data-path counters are
    /// read now (the rest changes only on the control-plane thread). Safe from any thread.
    public func snapshots() -> [VBDSnapshot] {
        lock.withLock { published }.map { entry in
            var snapshot = entry.snapshot
            if let rings = entry.rings { snapshot.statistics = rings.statistics }
            return snapshot
        }
    }

    /// Queues an operator's command for the control-plane thread; `answer` is called once,
    /// from another thread, with the VBD as it is right after the command, or with a failure
    /// (at the latest after `timeout` seconds). The selector picks the VBD as the API's GET
    /// does (`VBDSelector.pick`). Safe from any thread; never touches the data plane's threads.
    public func submit(_ command: VBDCommand, on selector: VBDSelector, timeout: Double,
                       answer: @escaping @Sendable (Result<VBDSnapshot, VBDCommandError>) -> Void) {
        let pending = PendingCommand(command, selector: selector, whenAnswered: answer)
        let accepted = lock.withLock {
            guard !stopRequested, thread != nil else { return false }
            commands.append(pending)
            return true
        }
        guard accepted else { return pending.answer(.failure(.unavailable("the backend is stopping"))) }
        pending.expire(after: timeout)
        wakeup.signal()
    }

    /// `submit`, waiting for the answer.
    public func perform(_ command: VBDCommand, on selector: VBDSelector,
                        timeout: Double) -> Result<VBDSnapshot, VBDCommandError> {
        let answered = DispatchSemaphore(value: 0)
        let result = Locked<Result<VBDSnapshot, VBDCommandError>?>(nil)
        submit(command, on: selector, timeout: timeout) { answer in
            result.withLock { $0 = answer }
            answered.signal()
        }
        answered.wait()
        return result.withLock { $0! }
    }

    // MARK: event loop

    private func run() {
        logger.info("control plane watching \(configuration.kinds.map { configuration.backendRoot(kind: $0) }.joined(separator: ", "))")
        var descriptors = [pollfd(fd: context.store.watchDescriptor, events: Int16(POLLIN), revents: 0),
                           pollfd(fd: wakeup.descriptor, events: Int16(POLLIN), revents: 0)]
        while !lock.withLock({ stopRequested }) {
            let idle = draining.isEmpty && !devices.values.contains(where: \.disconnectPending)
            // Connected devices are looked at every second: a store that grew or shrank.
            let timeout = !idle ? Self.drainRetryMilliseconds : devices.values.contains(where: \.isServing) ? 1000 : -1
            let ready = poll(&descriptors, nfds_t(descriptors.count), timeout)
            if ready < 0, Glibc.errno != EINTR {
                logger.critical("poll failed: \(String(cString: strerror(Glibc.errno)))")
                break
            }
            if descriptors[1].revents != 0 { wakeup.drain() }
            handle(context.store.pendingWatchEvents())
            performCommands()
            for completion in context.openings.completed() {
                devices[completion.vbd]?.opened(completion.result, ticket: completion.ticket)
            }
            retryDisconnects()
            checkSizes()
            publish()
        }
        shutdown(handingOver: lock.withLock { handOverAtStop })
    }

    /// backend/<kind>/<domid>, as named in xenstore (checked when its devices are).
    private struct DomainKey: Hashable {
        let kind: String
        let domid: String
    }

    /// Handles one batch of watch events. A burst of events (XSA-349) is coalesced first:
    /// each tree, domain directory and device is looked at once per batch, whatever the
    /// number of events that named it.
    private func handle(_ events: [XenStoreWatchEvent]) {
        guard !events.isEmpty else { return }
        var kinds = Set<String>()
        var domains = Set<DomainKey>()
        var deviceEvents: [VBDIdentity: Bool] = [:]   // value: an event named the device directory itself
        var frontendChanges = Set<VBDIdentity>()
        var physicalDeviceChanges = Set<VBDIdentity>()
        for event in events {
            switch WatchToken(event.token) {
            case .backendTree(let kind):
                let root = configuration.backendRoot(kind: kind)
                guard event.path.hasPrefix(root + "/") else { kinds.insert(kind); continue }
                let components = event.path.dropFirst(root.count + 1).split(separator: "/", maxSplits: 2)
                if components.count == 1 {
                    domains.insert(DomainKey(kind: kind, domid: String(components[0])))
                } else if components.count >= 2 {
                    // Names xenbus would not bind (not numbers, reserved domids) are left alone.
                    guard let key = VBDIdentity(kind: kind, domid: components[0], devid: components[1]) else {
                        logger.debug("ignoring \(event.path): not backend/<kind>/<domid>/<devid>")
                        continue
                    }
                    deviceEvents[key] = (deviceEvents[key] ?? false) || components.count == 2
                }
            case .frontendState(let vbd):
                frontendChanges.insert(vbd)
            case .physicalDevice(let vbd):
                physicalDeviceChanges.insert(vbd)
            case nil:
                logger.debug("watch event with unknown token \(event.token) for \(event.path)")
            }
        }
        for kind in kinds { scan(kind: kind) }
        for domain in domains where !kinds.contains(domain.kind) { scan(domain) }
        for (device, atDirectory) in deviceEvents
        where !kinds.contains(device.kind) && !domains.contains(DomainKey(kind: device.kind, domid: device.domid.description)) {
            check(device, atDirectory: atDirectory)
        }
        // The backing store first, so a frontend that is already waiting connects.
        for vbd in physicalDeviceChanges { devices[vbd]?.physicalDeviceChanged() }
        for vbd in frontendChanges {
            guard let device = devices[vbd] else { continue }
            if device.frontendStateChanged() == .unregister { forget(device, .unregistered) }
        }
    }

    /// The whole backend/<kind> tree: at start and when the tree itself changed.
    private func scan(kind: String) {
        do {
            let domids = Set(try context.store.directory(configuration.backendRoot(kind: kind)) ?? [])
            for device in devices.values where device.identity.kind == kind && !domids.contains(device.identity.domid.description) {
                forget(device, .removed)
            }
            for domid in domids { scan(DomainKey(kind: kind, domid: domid)) }
        } catch {
            logger.warning("scanning \(configuration.backendRoot(kind: kind)) failed: \(error)")
        }
    }

    /// backend/<kind>/<domid>: devices appearing and going for one frontend domain.
    private func scan(_ domain: DomainKey) {
        let path = "\(configuration.backendRoot(kind: domain.kind))/\(domain.domid)"
        do {
            let devids = Set(try context.store.directory(path) ?? [])
            for device in devices.values
            where device.identity.kind == domain.kind && device.identity.domid.description == domain.domid
                && !devids.contains(String(device.identity.devid)) {
                forget(device, .removed)
            }
            for devid in devids {
                guard let vbd = VBDIdentity(kind: domain.kind, domid: domain.domid, devid: devid) else {
                    logger.debug("ignoring \(path)/\(devid): not backend/<kind>/<domid>/<devid>")
                    continue
                }
                check(vbd, atDirectory: false)
            }
        } catch {
            logger.warning("scanning \(path) failed: \(error)")
        }
    }

    /// One device directory: probe it when it is new, forget it when it is gone.
    private func check(_ vbd: VBDIdentity, atDirectory: Bool) {
        let path = configuration.backendPath(vbd)
        do {
            if let device = devices[vbd] {
                if atDirectory, try context.store.directory(path) == nil {
                    forget(device, .removed)
                } else if try device.toolstackClosesUnconnected() {
                    // Nothing is mapped: answer Closed now, instead of letting the toolstack
                    // wait out its 10 s for a frontend that never connected.
                    forget(device, .unregistered)
                }
                return
            }
            // Like xenbus_probe_node: only a device the toolstack set up for a backend
            // (Initialising), or one a previous instance of this daemon left in InitWait or
            // closed at its shutdown while the toolstack still wants it (online=1) and its
            // frontend is still there: that one is offered again, so its guest reconnects
            // across a daemon restart. A device we unregistered (online=0, or its frontend
            // gone) stays Closed and is not probed again.
            let state = XenbusState(node: try context.store.read(path + "/state"))
            let online = XenbusValue.flag(try context.store.read(path + "/online"), default: false)
            if state == .closing, !online, !draining.contains(where: { $0.identity == vbd }) {
                answerClosingOfUnservedDevice(path)
                return
            }
            if state == .connected, online {
                // A previous daemon left it serving (a planned restart or a crash): resume.
                guard let frontend = try context.store.read(path + "/frontend"), try context.store.directory(frontend) != nil else { return }
                adopt(vbd, state).takeOver()
                return
            }
            switch state {
            case .initialising?, .initWait?:
                break
            case .closed? where online:
                guard let frontend = try context.store.read(path + "/frontend"), try context.store.directory(frontend) != nil else { return }
            default:
                return
            }
            adopt(vbd, state).probe()
        } catch {
            logger.warning("checking \(path) failed: \(error)")
        }
    }

    /// A device this daemon serves from now on.
    private func adopt(_ vbd: VBDIdentity, _ state: XenbusState?) -> VBD {
        let device = VBD(vbd, context: context)
        devices[vbd] = device
        context.events.publish(.added, vbd, [("backend_state", .text((state ?? .unknown).description))])
        return device
    }

    /// A toolstack's Closing (online=0) on a device we do not serve, or no longer serve: we
    /// forgot it when its frontend vanished, or a previous daemon instance left it. Nothing of
    /// ours is mapped, so answer Closed at once, as xenbus_dev_remove answers a Closing state,
    /// instead of letting the toolstack wait out its timeout.
    private func answerClosingOfUnservedDevice(_ path: String) {
        do {
            try context.store.transaction { transaction in
                guard XenbusState(node: try context.store.read(path + "/state", transaction: transaction)) == .closing else { return }
                try context.store.write(path + "/state", "\(XenbusState.closed.rawValue)", transaction: transaction)
            }
            logger.info("answered Closing of unserved device with Closed", metadata: ["backend": "\(path)"])
        } catch {
            logger.warning("answering Closing of \(path) failed: \(error)")
        }
    }

    private func forget(_ device: VBD, _ reason: VBD.StopReason) {
        devices[device.identity] = nil
        context.events.publish(.removed, device.identity, [("reason", .text("\(reason)"))])
        if let busy = device.stop(reason) { draining.append(busy) }
    }

    private func performCommands() {
        let batch: [PendingCommand] = lock.withLock {
            defer { commands.removeAll() }
            return commands
        }
        for pending in batch {
            guard let device = pending.selector.pick(devices.values, identity: \.identity) else {
                pending.answer(.failure(.unknownDevice))
                continue
            }
            do throws(VBDCommandError) {
                try device.perform(pending.command)
                pending.answer(.success(device.snapshot))
            } catch {
                pending.answer(.failure(error))
            }
        }
    }

    /// At most once a second: every connected device's store size (an online resize), and
    /// rings the data plane stopped serving.
    private func checkSizes() {
        let now = DispatchTime.now().uptimeNanoseconds
        guard now &- lastSizeCheck >= 1_000_000_000 else { return }
        lastSizeCheck = now
        for device in devices.values where device.isServing {
            do { try device.checkSize() } catch { logger.warning("checking the size of \(device.identity): \(error)") }
            device.reportHalt()
        }
    }

    private func retryDisconnects() {
        for device in devices.values where device.disconnectPending {
            if device.retryDisconnect() == .unregister { forget(device, .unregistered) }
        }
        draining.removeAll { $0.retry() }
    }

    private func publish() {
        let snapshots = devices.values.sorted { $0.identity < $1.identity }.map { ($0.snapshot, $0.connectedRings) }
        lock.withLock { published = snapshots }
    }

    /// Disconnects every device, giving in-flight requests a bounded time, then unwatches.
    private func shutdown(handingOver: Bool) {
        for device in devices.values { forget(device, handingOver ? .handover : .shutdown) }
        let deadline = Date().addingTimeInterval(Self.shutdownDrainSeconds)
        while !draining.isEmpty, Date() < deadline {
            usleep(UInt32(Self.drainRetryMilliseconds) * 1000)
            draining.removeAll { $0.retry() }
        }
        if !draining.isEmpty {
            // The frontend is answered all the same: it must not wait for a backend that is gone.
            logger.warning("\(draining.count) rings still had requests in flight at shutdown")
            for pending in draining { pending.afterwards() }
        }
        for kind in configuration.kinds {
            try? context.store.unwatch(configuration.backendRoot(kind: kind), token: WatchToken.backendTree(kind: kind).text)
        }
        let unanswered = lock.withLock {
            watching = false
            published = []
            defer { commands.removeAll() }
            return commands
        }
        for pending in unanswered { pending.answer(.failure(.unavailable("the backend is stopping"))) }
        logger.info("control plane stopped")
    }
}
