import Blkif
import Dispatch
import Foundation
internal import CURing
import Glibc
import Hypervisor
import Logging
import NBD
import Synchronization
import VBDInterface

/// The data plane of Linux xen-blkback (blkback.c) over the hypervisor ports and io_uring:
/// one worker thread per ring. With feature-persistent agreed, each ring keeps the guest's
/// pages mapped across requests (RingGrants); otherwise each batch of requests maps its pages
/// and every request unmaps them before it is answered, or (direct-copy) has them copied by
/// the hypervisor through daemon memory.
public final class BlkbackDataPlane: DataPlane {
    /// How pages not kept mapped reach the backing store (the operator's --io-mode).
    public enum IOPolicy: String, Sendable, CaseIterable {
        /// Direct I/O; pages mapped per request where an unmap is done when it returns (the
        /// simulator), grant copy where it may lag behind direct I/O (gntdev since Linux 5.19).
        case auto
        /// Direct I/O on daemon memory filled and emptied by grant copy.
        case directCopy = "direct-copy"
        /// dom0's page cache, on mapped pages.
        case buffered
    }

    private let services: HypervisorServices
    private let policy: IOPolicy
    /// Where each ring's journal lives (RingJournal): a directory that outlives the process
    /// but not the host, /run/blkback-server by default.
    private let journalDirectory: String
    private let logger: Logger
    /// Each guest's grant cap, over all its VBDs.
    private let grantBudgets: DomainGrantBudgets
    /// This boot's /proc/sys/kernel/random/boot_id: a journal from another boot is stale.
    private let bootID: String
    /// Seconds requests wait for a lost network store (NBD) before they fail.
    private let storeRetryTimeout: Double
    /// The longest a ring worker spins before it sleeps (AdaptivePollWindow).
    private let maxPollNanoseconds: UInt64

    /// The grant pages one guest may have mapped at once, over all its VBDs; more travel by grant copy.
    public static let defaultMaxGrantsPerDomain = 16384

    public static let defaultStoreRetryTimeout = 60.0

    /// Near QEMU's 32 µs (poll-max-ns of its iothreads). Measured on a 2-vCPU VM through NBD:
    /// 4k reads at queue depth 32 gain a few percent; at depth 1 the waits are longer, and
    /// only a maximum near 200 µs pays (twice the IOPS, for a core spinning).
    public static let defaultMaxPollMicroseconds = 50

    public init(services: HypervisorServices, policy: IOPolicy = .auto, journalDirectory: String,
                maxGrantsPerDomain: Int = defaultMaxGrantsPerDomain, storeRetryTimeout: Double = defaultStoreRetryTimeout,
                maxPollMicroseconds: Int = defaultMaxPollMicroseconds, logger: Logger) {
        self.services = services
        self.storeRetryTimeout = storeRetryTimeout
        maxPollNanoseconds = UInt64(max(maxPollMicroseconds, 0)) * 1000
        grantBudgets = DomainGrantBudgets(limit: maxGrantsPerDomain)
        self.policy = policy
        self.journalDirectory = journalDirectory
        self.logger = logger
        bootID = ((try? String(contentsOfFile: "/proc/sys/kernel/random/boot_id", encoding: .utf8)) ?? "unknown")
            .trimmingCharacters(in: .whitespacesAndNewlines)
    }

    public func prepare(_ store: BackingStore) throws -> any PreparedStore {
        guard case .local(let descriptor) = store.medium else { return PreparedIO(io: nil, holePunchGranularity: nil) }
        let io = try IODescriptor(store: store, descriptor: descriptor, allowDirect: policy != .buffered)
        let granularity = store.isBlockDevice || store.readOnly ? nil : io.holePunchGranularity()
        return PreparedIO(io: io, holePunchGranularity: granularity)
    }

    /// xen_blkif_map for every queue, then the xenblkd threads. All or nothing.
    public func connect(_ request: DataPlaneRequest) throws -> any ConnectedRings {
        var logger = self.logger
        logger[metadataKey: "vbd"] = "\(request.vbd)"
        let store = request.backingStore
        guard let prepared = request.prepared as? PreparedIO else {
            throw DataPlaneError("the backing store was prepared by another data plane")
        }
        let io = prepared.io
        var features: BlockFeatures
        let copyTransient: Bool
        let ioMode: IOMode
        let access: StoreAccess
        switch (store.medium, io) {
        case (.local, let io?):
            features = Self.features(of: store, prepared, discardEnabled: request.discardEnabled)
            features.persistentGrants = request.rings.persistentGrants
            // Pages that are not kept mapped are copied whenever direct I/O could outlive their unmap.
            copyTransient = io.direct && (policy == .directCopy || !services.grants.unmapIsSynchronousAfterDirectIO)
            ioMode = !io.direct ? .buffered : features.persistentGrants ? .directPersistent
                : copyTransient ? .directCopy : .directMap
            access = .local(descriptor: io.descriptor, isBlockDevice: store.isBlockDevice)
        case (.nbd(let export), _):
            // Every page is copied to daemon memory, where a request's pages lie side by side
            // and go out as one NBD command; nothing of the guest stays mapped meanwhile.
            features = Self.features(of: export.info, readOnly: store.readOnly, discardEnabled: request.discardEnabled)
            copyTransient = true
            ioMode = .copy
            access = .nbd(NBDTarget(export: export, retryTimeout: storeRetryTimeout))
        case (.rbd(let image), _):
            // As for NBD; librbd copies a write into its own buffers anyway.
            features = Self.features(ofRBD: store.readOnly, discardEnabled: request.discardEnabled)
            copyTransient = true
            ioMode = .copy
            access = .rbd(image)
        case (.local, nil):
            throw DataPlaneError("the backing store of \(request.vbd) was not prepared for local I/O")
        }
        let maxIndirect = min(max(request.maxIndirectSegments, 0), Blkif.maxIndirectSegments)
        let device = DeviceContext(
            domid: request.vbd.domid.rawValue, access: access,
            fixedLimits: BlkifRequestLimits(sectors: store.sectors, readOnly: store.readOnly, maxIndirectSegments: maxIndirect,
                                       sectorsPerBlock: UInt64(max(store.logicalSectorSize, 512) / 512)),
            capacity: DeviceCapacity(sectors: request.sectors ?? store.sectors), features: features, ringRefs: Set(request.rings.queues.flatMap(\.ringRefs)),
            persistentGrants: features.persistentGrants, maxPersistentGrants: request.maxPersistentGrants,
            copyTransient: copyTransient, maxPollNanoseconds: maxPollNanoseconds, grantBudget: grantBudgets.budget(of: request.vbd.domid.rawValue), throttle: QoSThrottle(request.qos, now: DispatchTime.now().uptimeNanoseconds),
            events: request.events)

        var workers: [RingWorker] = []
        do {
            for (queue, description) in request.rings.queues.enumerated() {
                workers.append(try makeWorker(queue: queue, description, request: request, device: device, logger: logger))
            }
        } catch {
            for worker in workers { worker.release() }
            throw error
        }
        // Written before the rings run, so a crash from here on leaves it for the successor.
        var lockHolderRecord: String?
        if let holder = store.lockHolder {
            let path = lockHolderPath(request.vbd)
            do {
                try holder.write(toFile: path, atomically: true, encoding: .utf8)
                lockHolderRecord = path
            } catch {
                logger.warning("recording the lock holder in \(path): \(error); after a crash the next daemon waits for Ceph to expire this client's lock")
            }
        }
        for worker in workers {
            // As Linux's blkback names its threads, <domid>.<device>-<queue>, the device by number.
            worker.start(name: "\(request.vbd.domid).\(request.vbd.devid)-\(worker.queue)")
        }
        logger.info("""
            serving \(workers.count) ring(s) on \(store.path) (io_mode \(ioMode.rawValue)\
            \(features.persistentGrants ? ", up to \(request.maxPersistentGrants) persistent grants per ring" : ""); \
            flush, barrier\(features.discard ? ", discard" : "")\(maxIndirect > 0 ? ", \(maxIndirect) indirect segments" : ""))
            """)
        return ConnectedVBD(workers: workers, io: io, features: features, ioMode: ioMode, throttle: device.throttle,
                            capacity: device.capacity, lockHolderRecord: lockHolderRecord, logger: logger)
    }

    public func recordedLockHolder(of vbd: VBDIdentity) -> String? {
        guard let text = try? String(contentsOfFile: lockHolderPath(vbd), encoding: .utf8) else { return nil }
        let holder = text.trimmingCharacters(in: .whitespacesAndNewlines)
        return holder.isEmpty ? nil : holder
    }

    private func lockHolderPath(_ vbd: VBDIdentity) -> String {
        "\(journalDirectory)/\(vbd.kind)-\(vbd.domid)-\(vbd.devid).lock-holder"
    }

    /// The journal file of one ring, and the text that names the ring it belongs to: the
    /// device, what the frontend negotiated and this boot.
    private func journal(queue: Int, _ description: RingQueue, request: DataPlaneRequest) -> (path: String, identity: String) {
        let vbd = request.vbd
        let path = "\(journalDirectory)/\(vbd.kind)-\(vbd.domid)-\(vbd.devid)-ring\(queue).journal"
        let identity = """
            \(vbd) queue \(queue) of \(request.rings.queues.count), \(request.rings.protocol), ring page order \
            \(request.rings.ringPageOrder), ring-ref \(description.ringRefs), event-channel \(description.eventChannel), \
            persistent \(request.rings.persistentGrants), boot \(bootID)
            """
        return (path, identity)
    }

    /// Maps one queue's ring pages, binds its event channel on a handle of its own and
    /// attaches the ring; undoes what it did when a step fails.
    private func makeWorker(queue: Int, _ description: RingQueue, request: DataPlaneRequest,
                            device: DeviceContext, logger: Logger) throws -> RingWorker {
        let ringMapping: GrantMapping
        do {
            ringMapping = try services.grants.map(domain: request.vbd.domid.rawValue, refs: description.ringRefs, writable: true)
        } catch {
            throw DataPlaneError("mapping ring of queue \(queue) (refs \(description.ringRefs)): \(error)")
        }
        let shared = SharedRing(memory: ringMapping.base, pageCount: ringMapping.pageCount, protocol: request.rings.protocol)
        let (path, identity) = journal(queue: queue, description, request: request)
        let journal: RingJournal
        var recovery: RingJournal.Recovery?
        do {
            if request.resume && access(path, F_OK) != 0 {
                throw RingJournal.Refusal(description: "no journal \(path): the previous daemon left nothing to resume from")
            }
            journal = try RingJournal(path: path, identity: identity, ringSize: shared.size, layout: shared.layout)
            if request.resume {
                recovery = try journal.recover(identity: identity, ring: shared)
            } else {
                journal.start(identity: identity, at: 0)
            }
        } catch {
            try? ringMapping.unmap()
            throw DataPlaneError("\(request.resume ? "taking over" : "journaling") queue \(queue): \(error)")
        }
        let eventChannels: any EventChannels
        let port: UInt32
        do {
            eventChannels = try services.openEventChannels()
            port = try bind(eventChannels, request.vbd.domid.rawValue, description.eventChannel, patiently: request.resume)
        } catch {
            try? ringMapping.unmap()
            throw DataPlaneError("binding event channel \(description.eventChannel) of queue \(queue): \(error)")
        }
        do {
            return try RingWorker(queue: queue, localPort: port, eventChannels: eventChannels, grants: services.grants,
                                  ringMapping: ringMapping, shared: shared, journal: journal, recovery: recovery,
                                  device: device, logger: logger)
        } catch {
            try? eventChannels.unbind(port)
            try? ringMapping.unmap()
            throw DataPlaneError("starting queue \(queue): \(error)")
        }
    }

    /// EVTCHNOP_bind_interdomain. Taking a ring over, the guest's port may still be bound to
    /// the predecessor for a moment (its handle is being closed): try for up to 2 s.
    private func bind(_ channels: any EventChannels, _ domain: UInt32, _ port: UInt32, patiently: Bool) throws -> UInt32 {
        var attempts = patiently ? 20 : 1
        while true {
            do {
                return try channels.bindInterdomain(remoteDomain: domain, remotePort: port)
            } catch let error as HypervisorError where error.errno == EINVAL && attempts > 1 {
                attempts -= 1
                usleep(100_000)
            }
        }
    }

    /// An NBD export's operations, as its server offered them: flush and barrier always (a
    /// server that takes no flush has no cache to flush), discard as trim where the server
    /// trims, granular to its preferred block size.
    static func features(of export: NBDExportInfo, readOnly: Bool, discardEnabled: Bool) -> BlockFeatures {
        var features = BlockFeatures(flush: true, barrier: true)
        if discardEnabled, !readOnly, export.canTrim {
            features.discard = true
            features.discardGranularity = max(512, min(export.preferredBlockSize, 1 << 20))
        }
        return features
    }

    /// An RBD image's operations: flush and barrier, and discard on a writable image, granular
    /// to the 64 KiB librbd discards whole (rbd_discard_granularity_bytes; it skips the rest).
    static func features(ofRBD readOnly: Bool, discardEnabled: Bool) -> BlockFeatures {
        var features = BlockFeatures(flush: true, barrier: true)
        if discardEnabled, !readOnly {
            features.discard = true
            features.discardGranularity = 65536
        }
        return features
    }

    /// What this backing store gets: flush and barrier always (fdatasync); discard, unless the
    /// toolstack said discard-enable=0, on a writable block device whose queue takes discards
    /// (its granularity and alignment from sysfs, as Linux blkback takes them from the queue;
    /// discard-secure when it takes secure erase) or a writable regular file whose file system punches holes.
    static func features(of store: BackingStore, _ prepared: PreparedIO, discardEnabled: Bool) -> BlockFeatures {
        var features = BlockFeatures(flush: true, barrier: true)
        guard discardEnabled, !store.readOnly else { return features }
        if let limits = store.discardLimits {
            features.discard = true
            features.discardGranularity = limits.granularity
            features.discardAlignment = limits.alignment
            features.discardSecure = store.takesSecureErase
        } else if !store.isBlockDevice, let granularity = prepared.holePunchGranularity {
            features.discard = true
            features.discardGranularity = granularity
            features.discardAlignment = 0
        }
        return features
    }
}

/// A device's size in sectors, read by its rings for every request and changed by an online
/// resize.
final class DeviceCapacity: Sendable {
    private let value: Atomic<UInt64>
    init(sectors: UInt64) { value = Atomic(sectors) }
    var sectors: UInt64 {
        get { value.load(ordering: .acquiring) }
        set { value.store(newValue, ordering: .releasing) }
    }
}

/// A local store's I/O descriptor and whether its file system punches holes, found once
/// (nothing for a network store: each ring connects on its own).
final class PreparedIO: PreparedStore {
    let io: IODescriptor?
    let holePunchGranularity: UInt32?

    init(io: IODescriptor?, holePunchGranularity: UInt32?) {
        self.io = io
        self.holePunchGranularity = holePunchGranularity
    }
}

/// A data plane failure for the control plane's error node: one line.
struct DataPlaneError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// The backing store's descriptor for guest I/O: reopened with O_DIRECT unless the operator
/// asked for buffered I/O and when the store takes direct I/O of its sector size, else a
/// duplicate of the buffered one (FLUSH still fdatasyncs).
final class IODescriptor: Sendable {
    let descriptor: Int32
    let direct: Bool

    init(store: BackingStore, descriptor storeDescriptor: Int32, allowDirect: Bool) throws {
        let access = store.readOnly ? O_RDONLY : O_RDWR
        let reopened = !allowDirect ? -1 : open("/proc/self/fd/\(storeDescriptor)", access | O_CLOEXEC | O_NOCTTY | curing_o_direct())
        if reopened >= 0, Self.directIOWorks(reopened, blockSize: Int(max(store.logicalSectorSize, 512))) {
            descriptor = reopened
            direct = true
            return
        }
        if reopened >= 0 { close(reopened) }
        let duplicate = fcntl(storeDescriptor, F_DUPFD_CLOEXEC, 0)
        guard duplicate >= 0 else { throw DataPlaneError("duplicating the descriptor of \(store.path): \(SystemCallError(operation: "fcntl"))") }
        descriptor = duplicate
        direct = false
    }

    deinit { close(descriptor) }

    /// Some file systems accept O_DIRECT at open but refuse I/O of a given alignment.
    private static func directIOWorks(_ descriptor: Int32, blockSize: Int) -> Bool {
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: blockSize, alignment: 4096)
        defer { buffer.deallocate() }
        return pread(descriptor, buffer, blockSize, 0) >= 0
    }

    /// The file system block size if punching a hole works here (tried past the end of the
    /// file, which changes nothing), else nil.
    func holePunchGranularity() -> UInt32? {
        var info = stat()
        guard fstat(descriptor, &info) == 0 else { return nil }
        let block = max(Int(info.st_blksize), 512)
        let end = (Int(info.st_size) + block - 1) / block * block
        // Through io_uring, the path discards take (glibc hides fallocate behind _GNU_SOURCE).
        guard let probe = try? IOURing(entries: 1),
              (try? probe.punchHole(descriptor, offset: UInt64(end), length: UInt64(block), tag: 0)) != nil,
              (try? probe.submitAndWait(minimum: 1, milliseconds: 5000)) == true else { return nil }
        var result: Int32?
        probe.reapCompletions { result = $0.result }
        return result == 0 ? UInt32(block) : nil
    }
}

/// One VBD's rings while served.
final class ConnectedVBD: ConnectedRings {
    let features: BlockFeatures
    let ioMode: IOMode
    private let throttle: QoSThrottle
    private let capacity: DeviceCapacity
    private let workers: [RingWorker]
    /// Kept open while the rings do I/O on it (nil for a network store).
    private let io: IODescriptor?
    /// The store lock holder's record (`recordedLockHolder`), kept with the journals.
    private let lockHolderRecord: String?
    private let logger: Logger
    /// Released once; later disconnect() calls only report true.
    private let released = Locked(false)

    init(workers: [RingWorker], io: IODescriptor?, features: BlockFeatures, ioMode: IOMode, throttle: QoSThrottle,
         capacity: DeviceCapacity, lockHolderRecord: String?, logger: Logger) {
        self.lockHolderRecord = lockHolderRecord
        self.throttle = throttle
        self.capacity = capacity
        self.workers = workers
        self.io = io
        self.features = features
        self.ioMode = ioMode
        self.logger = logger
    }

    var qos: QoSLimits { throttle.limits }

    /// Fault injection for tests: each ring's next `count` submissions fail with `errno`.
    func failSubmissions(_ count: Int, errno: Int32) {
        for worker in workers { worker.failSubmissions(count, errno: errno) }
    }

    func resize(sectors: UInt64) {
        capacity.sectors = sectors
    }

    func setQoS(_ limits: QoSLimits) {
        throttle.update(limits, now: DispatchTime.now().uptimeNanoseconds)
        logger.info("QoS limits now \(limits.isUnlimited ? "none" : "\(limits)")")
    }

    var haltReason: String? { workers.lazy.compactMap(\.haltReason).first }

    var statistics: VBDStatistics {
        var total = VBDStatistics()
        for worker in workers { total.add(worker.statistics.snapshot) }
        return total
    }

    /// xen_blkif_disconnect: stop taking requests; -EBUSY (false) while any ring still has
    /// requests in flight; then stop the threads, unbind, unmap, remove the journals.
    func disconnect() -> Bool { stop(keepingJournals: false) }

    func handOver() -> Bool { stop(keepingJournals: true) }

    private func stop(keepingJournals: Bool) -> Bool {
        released.withLock { done in
            if done { return true }
            for worker in workers { worker.requestStop() }
            let busy = workers.reduce(0) { $0 + $1.inflight }
            // Idle workers exit as soon as they see the stop; a request taken just before it
            // keeps one running, which counts as in flight.
            guard busy == 0, workers.allSatisfy({ $0.waitForExit(milliseconds: 50) }) else {
                logger.debug("disconnect: \(busy) request(s) in flight")
                return false
            }
            for worker in workers { worker.release(keepingJournal: keepingJournals) }
            if !keepingJournals, let lockHolderRecord { unlink(lockHolderRecord) }
            done = true
            logger.info(keepingJournals ? "rings left to the next daemon" : "rings released")
            return true
        }
    }
}
