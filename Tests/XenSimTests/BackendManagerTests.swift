import Engine
import Foundation
import Glibc
import SimHypervisor
import Synchronization
import Testing
import XenSim

/// The backend manager and the VBD lifecycle in this process: the simulated xenstored and
/// event-channel broker on a thread of their own, the toolstack and a simulated blkfront as
/// the other parties, and the manager with the real data plane over the simulator's grants
/// and event channels. Serialized: libxenstore takes its socket from the environment.
@Suite(.serialized) struct BackendManagerTests {
    /// Backend states as written in xenstore.
    static let initWait = "\(XenbusState.initWait.rawValue)"
    static let connected = "\(XenbusState.connected.rawValue)"
    static let closing = "\(XenbusState.closing.rawValue)"
    static let closed = "\(XenbusState.closed.rawValue)"

    @Test func probeWritesLimitsAndOffersTheDeviceInInitWait() throws {
        try BackendRig.run { rig in
            #expect(rig.manager.isWatching)
            #expect(rig.manager.snapshots().isEmpty)

            try rig.attach()
            #expect(try rig.read("state") == Self.initWait)
            let defaults = BackendConfiguration()
            #expect(try rig.read("multi-queue-max-queues") == "\(defaults.maxQueues)")
            #expect(try rig.read("max-ring-page-order") == "\(defaults.maxRingPageOrder)")
            #expect(try rig.read("feature-max-indirect-segments") == "\(defaults.maxIndirectSegments)")
            // Nothing of connect() yet: the disk's size is published only once connected.
            #expect(try rig.read("sectors") == nil)

            #expect(rig.waitForSnapshots { $0.count == 1 && $0[0].backendState == .initWait })
            let snapshot = try #require(rig.onlySnapshot)
            #expect(snapshot.identity == BackendRig.identity)
            #expect(snapshot.kind == "vbd" && snapshot.domid == BackendRig.domid && snapshot.devid == BackendRig.devid)
            #expect(snapshot.backendPath == rig.backendPath)
            #expect(snapshot.frontendPath == rig.frontendPath)
            // No hotplug script for a file: params is opened at probe.
            #expect(snapshot.target == rig.diskPath)
            #expect(snapshot.mode == "w")
            #expect(snapshot.sectors == (16 << 20) / 512)
            #expect(snapshot.frontendState == .initialising)
            #expect(snapshot.queues == 0 && snapshot.protocol == nil && snapshot.statistics == nil)
            #expect(snapshot.error == nil)
        }
    }

    @Test func frontendConnectsRunsVerifiedIOAndClosesTheBackend() throws {
        try BackendRig.run { rig in
            try rig.attach()
            let frontendLog = MessageLog()
            var workload = WorkloadConfiguration(kind: .verify, blockSize: 4096, queueDepth: 32)
            workload.bytes = 1 << 20
            // Connects: rings, Initialised, the backend's Connected, then the frontend's.
            let run = try FrontendRun(device: try rig.frontend(), configuration: FrontendConfiguration(workload: workload),
                                      log: frontendLog.append)
            #expect(try rig.read("state") == Self.connected)
            #expect(try rig.read("sectors") == "\((16 << 20) / 512)")
            #expect(rig.waitForSnapshots { $0.first?.backendState == .connected && $0.first?.frontendState == .connected })
            let connected = try #require(rig.onlySnapshot)
            #expect(connected.queues >= 1)
            #expect(connected.protocol != nil)
            #expect(connected.statistics != nil)

            // The manager's counters, read on every turn of the frontend's loop: the last read
            // comes after the frontend has every response, before it closes.
            var lastStatistics: VBDStatistics?
            let report = run.run {
                if let statistics = rig.manager.snapshots().first?.statistics { lastStatistics = statistics }
                return false
            }
            #expect(report.errors == 0, "\(frontendLog.messages)")
            #expect(report.verifyFailures == 0)
            #expect(report.error == nil)
            #expect(report.writes > 0 && report.reads > 0)
            let statistics = try #require(lastStatistics)
            #expect(statistics.writeRequests > 0)
            #expect(statistics.readRequests > 0)
            #expect(statistics.errors == 0)

            // run() closed the device: Closing, Closed, grants ended. The backend followed and
            // released the rings first: it maps none of the guest's pages any more.
            #expect(report.grantsStillMapped == 0)
            #expect(try rig.grantsMappedByBackend() == 0)
            #expect(rig.waitForBackendState(.closed))
            #expect(rig.waitForSnapshots { snapshots in
                snapshots.count == 1 && snapshots[0].backendState == .closed && snapshots[0].frontendState == .closed
            })
            let closed = try #require(rig.onlySnapshot)
            #expect(closed.queues == 0)
            #expect(closed.statistics == nil)
            #expect(closed.error == nil)
        }
    }

    /// A data plane whose store preparation blocks until released: a file system slow to answer.
    final class SlowStore: DataPlane, @unchecked Sendable {
        let inner: BlkbackDataPlane
        let release = DispatchSemaphore(value: 0)
        let waiting = Locked(0)
        init(_ inner: BlkbackDataPlane) { self.inner = inner }
        func prepare(_ store: BackingStore) throws -> any PreparedStore {
            waiting.withLock { $0 += 1 }
            release.wait()
            return try inner.prepare(store)
        }
        func connect(_ request: DataPlaneRequest) throws -> any ConnectedRings { try inner.connect(request) }
        func recordedLockHolder(of vbd: VBDIdentity) -> String? { inner.recordedLockHolder(of: vbd) }
    }

    /// The backing store is opened and its I/O paths tried off the control-plane thread:
    /// while the store is slow to answer, the device is not offered yet (no InitWait) and the
    /// control plane goes on with everything else (an operator's command here); a reconnect
    /// does not try the store again.
    @Test func aSlowStoreHoldsUpOnlyItsOwnConnect() throws {
        var slow: SlowStore?
        try BackendRig.run(wrap: { inner in
            let wrapper = SlowStore(inner)
            slow = wrapper
            return wrapper
        }) { rig in
            let slow = try #require(slow)
            // While the attach waits for InitWait, another thread asks the control plane for
            // something, then lets the store answer.
            let manager = rig.manager
            let meanwhile = Locked<(answer: Result<VBDSnapshot, VBDCommandError>?, state: XenbusState?)>((nil, nil))
            let administrator = Thread {
                guard eventually(within: 60, { slow.waiting.withLock { $0 } == 1 }) else {
                    slow.release.signal()
                    return
                }
                var limits = QoSLimits()
                limits.totalIOPS = 500
                let answer = manager.perform(.qos(limits), on: BackendRig.selector, timeout: 5)
                let state = manager.snapshots().first?.backendState
                meanwhile.withLock { $0 = (answer, state) }
                slow.release.signal()
            }
            administrator.start()
            try rig.attach()
            let (answer, state) = meanwhile.withLock { $0 }
            #expect((try? answer?.get())?.qos.totalIOPS == 500, "\(String(describing: answer))")
            #expect(state == .initialising)
            let frontend = try rig.frontend()
            _ = try frontend.connect()
            #expect(try rig.backendState() == .connected)
            _ = frontend.close()
            #expect(rig.waitForBackendState(.closed))
            // Offered again and connected again: the store's findings are kept.
            #expect((try? rig.manager.perform(.state(.reconnect), on: BackendRig.selector, timeout: 5).get()) != nil)
            _ = try frontend.connect()
            #expect(try rig.backendState() == .connected)
            #expect(slow.waiting.withLock { $0 } == 1)
            _ = frontend.close()
        }
    }

    @Test func operatorCommandsChangeTheBackendState() throws {
        try BackendRig.run { rig in
            try rig.attach()
            let manager = rig.manager
            let selector = BackendRig.selector

            // closing first: the frontend-state watch the probe registered fires once at
            // registration, and the manager may handle that firing only after the first
            // command. Closing does not mind it; after a Closed, the unchanged Initialising
            // it reads would count as a frontend starting over and re-offer InitWait. The
            // command's own xenstore round trips queue the firing, so it is handled before
            // the next command.
            let closing = manager.perform(.state(.closing), on: selector, timeout: 5)
            #expect(try closing.get().backendState == .closing)
            #expect(try rig.read("state") == Self.closing)
            #expect(manager.perform(.state(.closing), on: selector, timeout: 5).isConflict)

            // reconnect: offered again (the frontend never left Initialising).
            let offered = manager.perform(.state(.reconnect), on: selector, timeout: 5)
            #expect(try offered.get().backendState == .initWait)
            #expect(try rig.read("state") == Self.initWait)
            #expect(manager.perform(.state(.reconnect), on: selector, timeout: 5).isConflict)

            // closed on an InitWait device: Closed at once, and it stays there.
            let closed = manager.perform(.state(.closed), on: selector, timeout: 5)
            #expect(try closed.get().backendState == .closed)
            #expect(try rig.read("state") == Self.closed)
            #expect(manager.perform(.state(.closed), on: selector, timeout: 5).isConflict)
            #expect(manager.perform(.state(.closing), on: selector, timeout: 5).isConflict)
            #expect(try rig.read("state") == Self.closed)
            #expect(try manager.perform(.state(.reconnect), on: selector, timeout: 5).get().backendState == .initWait)
            #expect(try rig.read("state") == Self.initWait)

            // Devices that are not served.
            let otherDevid = VBDSelector(domid: DomainID(rawValue: BackendRig.domid)!, devid: BackendRig.devid + 16)
            #expect(manager.perform(.state(.closed), on: otherDevid, timeout: 5) == .failure(.unknownDevice))
            let otherDomain = VBDSelector(domid: DomainID(rawValue: 2)!, devid: BackendRig.devid)
            #expect(manager.perform(.state(.closed), on: otherDomain, timeout: 5) == .failure(.unknownDevice))
            let otherKind = VBDSelector(domid: DomainID(rawValue: BackendRig.domid)!, devid: BackendRig.devid, kind: "qdisk")
            #expect(manager.perform(.state(.reconnect), on: otherKind, timeout: 5) == .failure(.unknownDevice))
            // Refused commands changed nothing.
            #expect(try rig.read("state") == Self.initWait)

            // After all that, a frontend still connects and its I/O verifies.
            var workload = WorkloadConfiguration(kind: .verify, blockSize: 4096, queueDepth: 8)
            workload.bytes = 256 << 10
            let run = try FrontendRun(device: try rig.frontend(), configuration: FrontendConfiguration(workload: workload),
                                      log: { _ in })
            let report = run.run { false }
            #expect(report.succeeded, "\(report.error ?? "")")
            #expect(rig.waitForBackendState(.closed))
        }
    }

    @Test func operatorClosingOfAConnectedDeviceAndReconnectResumeTheGuestsIO() throws {
        try BackendRig.run { rig in
            try rig.attach()
            let selector = BackendRig.selector
            let guest = try GuestThread(rig: rig, kind: .randrw, seconds: 300)
            defer { _ = guest.finish() }
            #expect(rig.waitForSnapshots { ($0.first?.statistics?.readRequests ?? 0) > 0 })

            // Refused while connected.
            #expect(rig.manager.perform(.state(.reconnect), on: selector, timeout: 5).isConflict)
            // closing: the guest answers Closed, the backend releases the rings and closes.
            #expect(try rig.manager.perform(.state(.closing), on: selector, timeout: 5).get().backendState == .closing)
            #expect(rig.waitForSnapshots { $0.first?.backendState == .closed && $0.first?.statistics == nil })
            // reconnect once the rings are released: the guest renegotiates by itself.
            var reconnect: Result<VBDSnapshot, VBDCommandError> = .failure(.unknownDevice)
            #expect(eventually {
                reconnect = rig.manager.perform(.state(.reconnect), on: selector, timeout: 5)
                return (try? reconnect.get()) != nil
            }, "\(reconnect)")
            #expect(rig.waitForSnapshots { $0.first?.backendState == .connected })
            let before = rig.onlySnapshot?.statistics?.readRequests ?? 0
            #expect(rig.waitForSnapshots { ($0.first?.statistics?.readRequests ?? 0) > before })

            let report = try #require(guest.finish())
            #expect(report.succeeded, "\(report.error ?? "") \(guest.log.messages)")
            #expect(report.reconnects == 1)
            #expect(report.grantsStillMapped == 0)
            #expect(try rig.grantsMappedByBackend() == 0)
            #expect(rig.waitForBackendState(.closed))
        }
    }

    @Test func detachRemovesTheDeviceAndStopLeavesNoWatches() throws {
        try BackendRig.run { rig in
            try rig.attach()
            // A guest with I/O running, which answers the toolstack's Closing like blkfront.
            let guest = try GuestThread(rig: rig, kind: .randread, seconds: 300)
            defer { _ = guest.finish() }
            #expect(rig.waitForSnapshots { ($0.first?.statistics?.readRequests ?? 0) > 0 })

            try rig.detach()
            #expect(rig.toolstackWarnings.isEmpty, "the backend did not close in time")
            // (The frontend directory is not checked: the guest, still running, may write its
            // own state again after the toolstack removed it, as a guest kernel could.)
            #expect(try rig.store.read(rig.backendPath) == nil)
            #expect(rig.waitForSnapshots { $0.isEmpty })
            // The guest saw its disk go away: its run ends by itself, with an error. Either it
            // saw online=0 ("detached"), or it read the backend's state only once the
            // directory was gone: xenstored then answers a guest EACCES, not ENOENT, as it
            // may not read the dom0-only parent, and Blockfront.backendState() throws it.
            let report = try #require(guest.finish())
            let error = report.error ?? ""
            #expect(error.contains("detached") || error.contains("Permission denied"), "\(report.error ?? "no error")")
            #expect(report.verifyFailures == 0)
            withKnownIssue("""
                On the frontend's Closed, VBD.frontendStateChanged writes Closed even when the \
                disconnect found requests in flight (the table's [disconnect, switchState(closed)]; \
                only a busy disconnect before a connect is fatal). The guest may then see Closed, \
                and the toolstack remove the device, while the backend still maps its pages; the \
                manager's drain releases them shortly after.
                """, isIntermittent: true) {
                #expect(report.grantsStillMapped == 0)
            }
            // The forgotten device's rings are drained and released all the same.
            #expect(eventually { ((try? rig.grantsMappedByBackend()) ?? -1) == 0 })

            rig.manager.stop()
            #expect(!rig.manager.isWatching)
            #expect(rig.manager.snapshots().isEmpty)
            guard case .failure(.unavailable) = rig.manager.perform(.state(.reconnect), on: BackendRig.selector, timeout: 5) else {
                Issue.record("a stopped manager took a command")
                return
            }
            rig.manager.stop()  // a second stop returns at once

            // Writes where the manager and its VBD watched: no watch of its connection fires.
            let leftovers = try watchEvents(on: rig.managerStore, writing: [
                rig.backendPath + "/state", rig.frontendPath + "/state", rig.backendPath + "/physical-device",
            ], with: rig.store)
            #expect(leftovers.isEmpty, "\(leftovers)")
            #expect(rig.manager.snapshots().isEmpty)
        }
    }

    @Test func destroyingTheDomainUnregistersItsIdleDevice() throws {
        try BackendRig.run { rig in
            try rig.attach()
            #expect(rig.waitForSnapshots { $0.count == 1 })
            // xl destroy: the frontend goes in the transaction that writes online=0 and
            // Closing; the backend sees frontend Unknown, unregisters and answers Closed.
            try rig.toolstack.destroyDomain(BackendRig.domid)
            #expect(rig.toolstackWarnings.isEmpty, "the backend did not close in time")
            #expect(try rig.store.read(rig.backendPath) == nil)
            #expect(rig.waitForSnapshots { $0.isEmpty })
            #expect(rig.manager.isWatching)
        }
    }

    @Test func stoppingTheManagerClosesAConnectedDevice() throws {
        try BackendRig.run { rig in
            try rig.attach()
            let guest = try GuestThread(rig: rig, kind: .randread, seconds: 300, reconnect: false)
            defer { _ = guest.finish() }
            #expect(rig.waitForSnapshots { ($0.first?.statistics?.readRequests ?? 0) > 0 })

            // At shutdown a connected device is closed (once its rings are released), so the
            // guest does not wait for a backend that is gone; the device itself stays.
            rig.manager.stop()
            #expect(rig.manager.snapshots().isEmpty)
            #expect(rig.waitForBackendState(.closed))
            #expect(try rig.read("online") == "1")
            let report = try #require(guest.finish())
            #expect(report.error?.contains("closed the device") == true, "\(report.error ?? "no error")")
            #expect(report.verifyFailures == 0)
            // At shutdown Closed comes only once the rings are released.
            #expect(report.grantsStillMapped == 0)
            #expect(try rig.grantsMappedByBackend() == 0)
        }
    }

    @Test func aStoppedManagerIsReleased() throws {
        weak var releasedRig: BackendRig?
        weak var releasedManager: BackendManager?
        try BackendRig.run { rig in
            releasedRig = rig
            releasedManager = rig.manager
            try rig.attach()
            rig.manager.stop()
        }
        #expect(releasedRig == nil)
        // stop() lets go of the control-plane thread, whose closure holds the manager until
        // the thread has really ended (a moment after stop() returns).
        #expect(eventually { releasedManager == nil })
    }
}

extension Result where Failure == VBDCommandError {
    var isConflict: Bool {
        if case .failure(.conflict) = self { return true }
        return false
    }
}

/// A simulated guest running a workload on its own thread until the workload's time is up,
/// its device goes away, or `finish()` asks it to stop.
final class GuestThread: @unchecked Sendable {
    let log = MessageLog()
    private let run: FrontendRun
    private let stopping = Atomic<Bool>(false)
    private let done = DispatchSemaphore(value: 0)
    private let lock = NSLock()
    private var report: FrontendReport?
    private var joined = false

    /// Connects now (on the caller's thread), then starts the workload.
    init(rig: BackendRig, kind: WorkloadKind, seconds: Double, reconnect: Bool = true) throws {
        var workload = WorkloadConfiguration(kind: kind, blockSize: 4096, queueDepth: 8)
        workload.seconds = seconds
        var configuration = FrontendConfiguration(workload: workload)
        configuration.reconnect = reconnect
        run = try FrontendRun(device: try rig.frontend(), configuration: configuration, log: log.append)
        let thread = Thread { [self] in
            let result = run.run { stopping.load(ordering: .acquiring) }
            lock.withLock { report = result }
            done.signal()
        }
        thread.name = "test-guest"
        thread.start()
    }

    /// Asks the workload to stop (if it still runs), waits for the thread, returns the report.
    func finish() -> FrontendReport? {
        stopping.store(true, ordering: .releasing)
        let first = lock.withLock {
            defer { joined = true }
            return !joined
        }
        if first { done.wait() }
        return lock.withLock { report }
    }
}

/// The watch events `observed` receives for writes (by `writer`) to `paths`. A sentinel watch
/// over /local/domain is registered on `observed` last; xenstored fires one write's watches
/// of a connection in the order they were registered, so once the sentinel has seen the last
/// write, the events of every older watch of that connection are queued too.
func watchEvents(on observed: XenStore, writing paths: [String], with writer: XenStore) throws -> [XenStoreWatchEvent] {
    let token = "test-sentinel"
    try observed.watch("/local/domain", token: token)
    defer { try? observed.unwatch("/local/domain", token: token) }
    // Whatever was queued before the sentinel (events the manager never took) is not ours.
    _ = observed.pendingWatchEvents()
    for path in paths { try writer.write(path, "1") }
    var events: [XenStoreWatchEvent] = []
    _ = eventually {
        events += observed.pendingWatchEvents()
        return events.contains { $0.token == token && $0.path == paths.last }
    }
    #expect(events.contains { $0.token == token && $0.path == paths.last }, "the sentinel never fired")
    return events.filter { $0.token != token }
}
