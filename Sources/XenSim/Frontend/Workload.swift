/// What the guest does with its disk, in fio's vocabulary.
public enum WorkloadKind: String, CaseIterable, Sendable, Codable {
    case randread, randwrite, read, write, randrw, verify
    /// DISCARD of each block of the region in turn (its contents are unknown afterwards).
    case discard

    public var writes: Bool { self != .randread && self != .read }
}

/// One I/O the workload wants issued. Sectors are 512-byte units, as on the ring.
public struct PlannedIO: Sendable, Equatable {
    public enum Operation: String, Sendable { case read, write, flush, discard }
    public var operation: Operation
    /// Index of the block in the region; nil for flushes.
    public var block: Int?
    public var sector: UInt64
    public var sectorCount: Int
    /// The generation stamped into every sector of a write; 0 otherwise.
    public var generation: UInt64

    public var byteCount: Int { sectorCount * SectorStamp.sectorSize }
}

/// Which sectors of each read the guest checks.
public enum ReadCheck: String, CaseIterable, Sendable {
    /// Every sector.
    case all
    /// The first sector of every 4 KiB page and the read's last sector: a page copied to the
    /// wrong place, not at all or short still shows, at an eighth of the memory traffic. For
    /// benchmarks, whose baseline (fio) never reads its data.
    case sample

    /// Sectors from one checked sector to the next.
    var stride: Int { self == .all ? 1 : 4096 / SectorStamp.sectorSize }
}

/// The workload's parameters, checked against the disk once it is connected.
public struct WorkloadConfiguration: Sendable {
    public var kind: WorkloadKind
    public var blockSize: Int
    public var queueDepth: Int
    /// Stop issuing after this much time (seconds) …
    public var seconds: Double?
    /// … or after this many bytes were issued. Neither: one pass over the region.
    public var bytes: UInt64?
    /// The part of the disk used, in bytes (size nil: up to the end of the disk).
    public var offset: UInt64 = 0
    public var size: UInt64?
    /// randrw: share of reads in percent.
    public var readPercent: Int = 50
    /// Issue a flush after every N writes (0: never; verify flushes once after writing).
    public var flushEvery: Int = 0
    /// Reads of sectors this run did not write must find an earlier run's stamp (zeros fail).
    public var verifyExisting = false
    public var readCheck = ReadCheck.all
    public var seed: UInt64?

    public init(kind: WorkloadKind, blockSize: Int = 4096, queueDepth: Int = 32) {
        self.kind = kind
        self.blockSize = blockSize
        self.queueDepth = queueDepth
    }
}

public struct WorkloadError: Error, CustomStringConvertible, Equatable {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// Decides the next I/O and keeps what every block of the region must hold: the generation
/// this run last wrote there, "not written by this run" (then zeros or any earlier run's
/// stamp are right), or "unknown" after a failed write. A block with an I/O in flight gets no
/// other I/O, so every read has exactly one right answer.
public struct Workload: Sendable {
    public let configuration: WorkloadConfiguration
    /// First sector of the region and sectors per block (512-byte units).
    public let firstSector: UInt64
    public let blockSectors: Int
    public let blockCount: Int
    /// Generations below this belong to earlier runs.
    public let generationBase: UInt64

    static let notWritten: UInt64 = 0
    static let unknown: UInt64 = .max
    private var expected: [UInt64]
    private var busy: [Bool]
    private var writesIssued: UInt64 = 0
    private var bytesIssued: UInt64 = 0
    private var cursor = 0
    private var random: UInt64
    private var verifyPhase = VerifyPhase.writing
    private var flushDue = false
    public private(set) var inFlight = 0
    private var stopped = false

    enum VerifyPhase { case writing, flushing, reading, done }

    /// `diskSectors` and `sectorSize` come from the backend at connect; `generationBase`
    /// must exceed every earlier run's (the caller uses the wall clock in nanoseconds).
    public init(_ configuration: WorkloadConfiguration, diskSectors: UInt64, sectorSize: Int,
                readOnly: Bool, generationBase: UInt64) throws(WorkloadError) {
        let diskBytes = diskSectors * UInt64(SectorStamp.sectorSize)
        let bs = configuration.blockSize
        guard bs > 0, bs % sectorSize == 0, bs % SectorStamp.sectorSize == 0 else {
            throw WorkloadError("--bs \(bs) is not a multiple of the disk's sector size \(sectorSize)")
        }
        guard configuration.offset % UInt64(bs) == 0 else {
            throw WorkloadError("--offset \(configuration.offset) is not a multiple of --bs \(bs)")
        }
        guard configuration.offset < diskBytes else {
            throw WorkloadError("--offset \(configuration.offset) is beyond the disk (\(diskBytes) bytes)")
        }
        var size = min(configuration.size ?? diskBytes, diskBytes - configuration.offset)
        // verify writes then reads its region once: --bytes sizes that region.
        if configuration.kind == .verify, let bytes = configuration.bytes { size = min(size, bytes) }
        let blocks = size / UInt64(bs)
        guard blocks > 0 else {
            throw WorkloadError("the region (\(size) bytes at offset \(configuration.offset)) holds no block of \(bs) bytes")
        }
        guard blocks <= UInt64(Int32.max) else { throw WorkloadError("the region has too many blocks; use a larger --bs or a --size") }
        if readOnly && configuration.kind.writes {
            throw WorkloadError("the disk is read-only (info has VDISK_READONLY); use --workload read or randread")
        }
        guard (1...100).contains(configuration.readPercent) || configuration.kind != .randrw else {
            throw WorkloadError("--read-percent must be within 1...100")
        }
        self.configuration = configuration
        firstSector = configuration.offset / UInt64(SectorStamp.sectorSize)
        blockSectors = bs / SectorStamp.sectorSize
        blockCount = Int(blocks)
        self.generationBase = generationBase
        expected = [UInt64](repeating: Self.notWritten, count: blockCount)
        busy = [Bool](repeating: false, count: blockCount)
        random = configuration.seed ?? generationBase
    }

    public var regionBytes: UInt64 { UInt64(blockCount) * UInt64(configuration.blockSize) }

    /// The byte budget: --bytes, or one pass over the region when neither limit is given.
    var byteLimit: UInt64? {
        if let bytes = configuration.bytes { return bytes }
        return configuration.seconds == nil ? regionBytes : nil
    }

    /// No more I/O will be issued (time or bytes used up, verify done, or `stop()`).
    public var exhausted: Bool {
        if stopped { return true }
        if flushDue { return false }  // the flush owed for the last writes still goes out
        if configuration.kind == .verify { return verifyPhase == .done }
        if let limit = byteLimit, bytesIssued >= limit { return true }
        return false
    }

    /// Exhausted and nothing in flight.
    public var finished: Bool { exhausted && inFlight == 0 }

    /// Stop issuing (time is up, a signal came).
    public mutating func stop() { stopped = true }

    /// The next I/O to issue, or nil when nothing can be issued now (all candidates busy,
    /// waiting for a phase to drain, or exhausted).
    public mutating func next() -> PlannedIO? {
        guard !exhausted else { return nil }
        if flushDue {
            flushDue = false
            return issue(PlannedIO(operation: .flush, block: nil, sector: 0, sectorCount: 0, generation: 0))
        }
        switch configuration.kind {
        case .read: return sequential(.read)
        case .write: return sequential(.write)
        case .randread: return randomBlock().flatMap { plan(.read, block: $0) }
        case .randwrite: return randomBlock().flatMap { plan(.write, block: $0) }
        case .randrw:
            let read = Int(nextRandom() % 100) < configuration.readPercent
            return randomBlock().flatMap { plan(read ? .read : .write, block: $0) }
        case .verify: return nextVerify()
        case .discard: return sequential(.discard)
        }
    }

    private mutating func nextVerify() -> PlannedIO? {
        switch verifyPhase {
        case .writing:
            if cursor < blockCount { return sequentialOnce(.write) }
            guard inFlight == 0 else { return nil }
            verifyPhase = .flushing
            return issue(PlannedIO(operation: .flush, block: nil, sector: 0, sectorCount: 0, generation: 0))
        case .flushing:
            guard inFlight == 0 else { return nil }
            verifyPhase = .reading
            cursor = 0
            return nextVerify()
        case .reading:
            if cursor < blockCount { return sequentialOnce(.read) }
            guard inFlight == 0 else { return nil }
            // With --seconds the passes repeat, each writing the region anew, until time is up.
            if configuration.seconds != nil {
                verifyPhase = .writing
                cursor = 0
                return nextVerify()
            }
            verifyPhase = .done
            return nil
        case .done:
            return nil
        }
    }

    private mutating func sequentialOnce(_ operation: PlannedIO.Operation) -> PlannedIO? {
        guard !busy[cursor] else { return nil }
        let block = cursor
        cursor += 1
        return plan(operation, block: block)
    }

    private mutating func sequential(_ operation: PlannedIO.Operation) -> PlannedIO? {
        guard !busy[cursor] else { return nil }
        let block = cursor
        cursor = (cursor + 1) % blockCount
        return plan(operation, block: block)
    }

    /// A random idle block; a few tries, then give up until something completes.
    private mutating func randomBlock() -> Int? {
        for _ in 0..<8 {
            let block = Int(nextRandom() % UInt64(blockCount))
            if !busy[block] { return block }
        }
        return nil
    }

    private mutating func plan(_ operation: PlannedIO.Operation, block: Int) -> PlannedIO {
        var generation: UInt64 = 0
        if operation == .write {
            writesIssued += 1
            generation = generationBase &+ writesIssued
            if configuration.flushEvery > 0 && writesIssued % UInt64(configuration.flushEvery) == 0 { flushDue = true }
        }
        busy[block] = true
        bytesIssued += UInt64(configuration.blockSize)
        return issue(PlannedIO(operation: operation, block: block,
                               sector: firstSector + UInt64(block) * UInt64(blockSectors),
                               sectorCount: blockSectors, generation: generation))
    }

    private mutating func issue(_ io: PlannedIO) -> PlannedIO {
        inFlight += 1
        return io
    }

    /// Records the outcome of `io`. A failed write leaves its block unknown.
    public mutating func completed(_ io: PlannedIO, success: Bool) {
        inFlight -= 1
        guard let block = io.block else { return }
        busy[block] = false
        if io.operation == .write { expected[block] = success ? io.generation : Self.unknown }
        // A discarded block may read back as zeros or as what it held.
        if io.operation == .discard { expected[block] = Self.unknown }
    }

    /// Checks the data a successful read of `io` returned, sector by sector (each sector's
    /// 512 bytes at `sectorData(k)`; which sectors: `readCheck`); returns how many of the
    /// checked sectors are wrong.
    public func verify(_ io: PlannedIO, sectorData: (Int) -> UnsafeRawPointer) -> Int {
        guard let block = io.block, io.operation == .read, io.sectorCount > 0 else { return 0 }
        let want = expected[block]
        let stride = configuration.readCheck.stride
        var failures = 0
        func check(_ k: Int) {
            let found = SectorStamp.check(sector: io.sector + UInt64(k), at: sectorData(k))
            if !acceptable(found, expected: want) { failures += 1 }
        }
        for k in Swift.stride(from: 0, to: io.sectorCount, by: stride) { check(k) }
        if (io.sectorCount - 1) % stride != 0 { check(io.sectorCount - 1) }
        return failures
    }

    func acceptable(_ found: SectorStamp.Contents, expected want: UInt64) -> Bool {
        switch (found, want) {
        case (.foreign, _): return false
        case (.zero, Self.notWritten): return !configuration.verifyExisting
        case (.zero, Self.unknown): return true
        case (.zero, _): return false
        case (.stamp(let generation), Self.notWritten): return generation < generationBase
        case (.stamp, Self.unknown): return true
        case (.stamp(let generation), _): return generation == want
        }
    }

    private mutating func nextRandom() -> UInt64 {
        // xorshift64*: the seed alone fixes the sequence, so --seed reproduces a run.
        if random == 0 { random = 0x2545_F491_4F6C_DD1D }
        random ^= random >> 12
        random ^= random << 25
        random ^= random >> 27
        return random &* 0x2545_F491_4F6C_DD1D
    }
}
