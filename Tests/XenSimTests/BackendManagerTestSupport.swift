import Engine
import Foundation
import Glibc
import Logging
import SimHypervisor
import Synchronization
import Testing
import XenStoreTestSupport
import XenSim

/// A logger for the in-process services that shows only what went wrong.
func quietLogger(_ label: String) -> Logger {
    var logger = Logger(label: label)
    logger.logLevel = .warning
    return logger
}

/// What `xensim run` serves, in this process: xenstored and the event-channel broker on one
/// `EventLoop`, run by a thread of its own. `stop()` wakes the loop through a pipe it
/// watches (EventLoop.stop() only sets a flag), joins the thread, and closes xenstored's
/// sockets (their files are removed).
final class InProcessXen: @unchecked Sendable {
    let layout: SimLayout
    private let loop = EventLoop()
    private let server: XenstoredServer
    private let broker: EventChannelBroker
    private let wakeRead: Int32
    private let wakeWrite: Int32
    private let exited = DispatchSemaphore(value: 0)
    private var stopped = false
    private let failure = Mutex<String?>(nil)

    init(directory: String) throws {
        layout = SimLayout(directory: directory)
        server = XenstoredServer(directory: layout, loop: loop, logger: quietLogger("test.xenstored"))
        broker = try EventChannelBroker(directory: directory, logger: quietLogger("test.evtchn"))
        var ends: [Int32] = [-1, -1]
        guard pipe(&ends) == 0 else { throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .EIO) }
        for end in ends {
            _ = fcntl(end, F_SETFD, FD_CLOEXEC)
            _ = fcntl(end, F_SETFL, fcntl(end, F_GETFL) | O_NONBLOCK)
        }
        wakeRead = ends[0]
        wakeWrite = ends[1]
        // As RunCommand.serve wires them.
        loop.register(broker.fileDescriptor) { [broker] _ in broker.handleEvents() }
        server.onDomainIntroduced = { [broker] domid in try broker.addDomain(domid) }
        server.onDomainReleased = { [broker] domid in broker.removeDomain(domid) }
        loop.register(wakeRead) { [unowned loop, wakeRead] _ in
            var bytes = [UInt8](repeating: 0, count: 16)
            while read(wakeRead, &bytes, bytes.count) > 0 {}
            loop.stop()
        }
        do {
            try server.start()
        } catch {
            close(wakeRead)
            close(wakeWrite)
            throw error
        }
        let thread = Thread { [self] in
            do { try loop.run(tick: broker.tick) } catch { failure.withLock { $0 = "event loop failed: \(error)" } }
            exited.signal()
        }
        thread.name = "test-xensim"
        thread.start()
    }

    /// Why the loop ended by itself, if it did.
    var loopFailure: String? { failure.withLock { $0 } }

    /// Ends the loop's thread and closes every socket; safe to call twice.
    func stop() {
        guard !stopped else { return }
        stopped = true
        var byte: UInt8 = 1
        _ = write(wakeWrite, &byte, 1)
        exited.wait()
        // The loop's thread is gone: the server and the loop are ours now.
        server.shutdown()
        server.onDomainIntroduced = nil
        server.onDomainReleased = nil
        loop.unregister(broker.fileDescriptor)
        loop.unregister(wakeRead)
        close(wakeRead)
        close(wakeWrite)
    }

    deinit { stop() }
}

/// A dom0 with a BackendManager over the in-process simulated Xen: a fresh directory, domain
/// 1 created by the toolstack, and a 16 MiB sparse disk file to attach. Built and torn down
/// by `BackendRig.run`.
final class BackendRig {
    static let domid: UInt32 = 1
    static let devid: UInt32 = 51712
    static var selector: VBDSelector { VBDSelector(domid: DomainID(rawValue: domid)!, devid: devid) }
    static var identity: VBDIdentity { VBDIdentity(kind: "vbd", domid: DomainID(rawValue: domid)!, devid: devid) }

    let directory: String
    let xen: InProcessXen
    /// The test's and the toolstack's dom0 connection (the manager has its own: the toolstack
    /// and the manager each take every watch event queued on their connection).
    let store: XenStore
    /// The manager's connection, to check which watches it left behind.
    let managerStore: XenStore
    let manager: BackendManager
    let toolstack: Toolstack
    let diskPath: String
    private let toolstackLog = MessageLog()

    var backendPath: String { toolstack.backendPath(kind: "vbd", domid: Self.domid, devid: Self.devid) }
    var frontendPath: String { Toolstack.frontendPath(kind: "vbd", domid: Self.domid, devid: Self.devid) }
    /// What the toolstack warned about (e.g. a backend that did not close in time).
    var toolstackWarnings: [String] { toolstackLog.messages }

    private init(directory: String, xen: InProcessXen, store: XenStore, managerStore: XenStore,
                 manager: BackendManager, diskPath: String) {
        self.directory = directory
        self.xen = xen
        self.store = store
        self.managerStore = managerStore
        self.manager = manager
        self.diskPath = diskPath
        toolstack = Toolstack(store: store, hypervisor: xen.layout, log: { [toolstackLog] in toolstackLog.append($0) })
    }

    /// Runs `body` against a fresh rig; everything started is stopped and removed afterwards,
    /// whatever `body` does.
    /// `wrap`: what the manager sees of the data plane (a test's stand-in around it).
    static func run(configuration: BackendConfiguration = BackendConfiguration(),
                    ioPolicy: BlkbackDataPlane.IOPolicy = .auto, wrap: (BlkbackDataPlane) -> any DataPlane = { $0 },
                    _ body: (BackendRig) throws -> Void) throws {
        let dir = SimDirectory()
        defer { dir.remove() }
        let xen = try InProcessXen(directory: dir.path)
        defer {
            xen.stop()
            #expect(xen.loopFailure == nil)
            #expect(xen.layout.socketFiles().isEmpty, "xenstored sockets left behind")
        }
        let diskPath = dir.path + "/disk.img"
        let fd = open(diskPath, O_RDWR | O_CREAT | O_TRUNC, 0o600)
        guard fd >= 0 else { throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .EIO) }
        let sized = ftruncate(fd, 16 << 20)
        close(fd)
        guard sized == 0 else { throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .EIO) }

        let store = try openXenStore(socket: xen.layout.xenstoredSocket)
        let managerStore = try openXenStore(socket: xen.layout.xenstoredSocket)
        let dataPlane = BlkbackDataPlane(services: try .simulator(directory: dir.path), policy: ioPolicy, journalDirectory: dir.path,
                                         logger: quietLogger("test.dataplane"))
        let manager = try BackendManager(configuration: configuration, store: managerStore, dataPlane: wrap(dataPlane),
                                         logger: quietLogger("test.control"))
        let rig = BackendRig(directory: dir.path, xen: xen, store: store, managerStore: managerStore, manager: manager,
                             diskPath: diskPath)
        try manager.start()
        defer { manager.stop() }
        try rig.toolstack.createDomain(domid, name: "guest\(domid)", memoryMB: 16)
        try body(rig)
    }

    // MARK: steps

    /// `xensim attach`: returns once the backend is in InitWait (the manager probed it).
    func attach(writable: Bool = true) throws {
        try toolstack.attach(.init(domid: Self.domid, devid: Self.devid, target: diskPath, writable: writable))
    }

    /// `xensim detach`: Closing with online=0, a wait for Closed, both directories removed.
    func detach() throws {
        try toolstack.detach(domid: Self.domid, devid: Self.devid)
    }

    /// Domain 1's own xenstore connection (DIR/dom1.sock), as a guest's frontend has.
    func guestStore() throws -> XenStore { try openXenStore(socket: xen.layout.guestSocket(Self.domid)) }

    /// A frontend for the attached disk, like `xensim frontend`.
    func frontend(options: BlockfrontOptions = BlockfrontOptions()) throws -> Blockfront {
        try Blockfront(store: try guestStore(), directory: directory, domid: Self.domid, devid: Self.devid, options: options)
    }

    // MARK: observing

    func read(_ key: String) throws -> String? { try store.read(backendPath + "/" + key) }

    /// The backend's `state` node as a state (nil: no node or no state).
    func backendState() throws -> XenbusState? { XenbusState(node: try read("state")) }

    /// Waits for the backend's `state` node to hold `state`. The deadline only fails a test
    /// whose event never comes.
    func waitForBackendState(_ state: XenbusState, within seconds: Double = 60) -> Bool {
        eventually(within: seconds) { ((try? backendState()) ?? nil) == state }
    }

    /// Waits until the manager's published snapshots satisfy `condition`.
    func waitForSnapshots(within seconds: Double = 60, _ condition: ([VBDSnapshot]) -> Bool) -> Bool {
        eventually(within: seconds) { condition(manager.snapshots()) }
    }

    /// How many of the guest's grants the backend maps now (GTF_reading or GTF_writing set
    /// in domain 1's grant table): 0 once every ring and data page is unmapped.
    func grantsMappedByBackend() throws -> Int {
        let table = try GuestGrantTable(directory: directory, domid: Self.domid)
        return (0..<UInt32(table.entryCount)).filter(table.isMappedByBackend).count
    }

    /// The one snapshot of our VBD, when it is the only one.
    var onlySnapshot: VBDSnapshot? {
        let snapshots = manager.snapshots()
        return snapshots.count == 1 ? snapshots[0] : nil
    }
}

/// Lines collected from any thread.
final class MessageLog: @unchecked Sendable {
    private let lock = NSLock()
    private var lines: [String] = []

    func append(_ line: String) { lock.withLock { lines.append(line) } }
    var messages: [String] { lock.withLock { lines } }
}
