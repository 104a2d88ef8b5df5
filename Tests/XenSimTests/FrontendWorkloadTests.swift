import Foundation
import Testing
@testable import XenSim

/// The workload's choices and its verification rules, with a RAM "disk" standing in for the
/// backend: every planned write lands in `disk`, every read is checked from it.
@Suite struct FrontendWorkloadTests {
    static let base: UInt64 = 1_000_000

    final class RamDisk {
        var bytes: [UInt8]
        init(sectors: Int) { bytes = [UInt8](repeating: 0, count: sectors * 512) }

        func write(_ io: PlannedIO) {
            bytes.withUnsafeMutableBytes { buffer in
                for k in 0..<io.sectorCount {
                    SectorStamp.write(sector: io.sector + UInt64(k), generation: io.generation,
                                      to: buffer.baseAddress! + (Int(io.sector) + k) * 512)
                }
            }
        }

        func verify(_ io: PlannedIO, with workload: Workload) -> Int {
            bytes.withUnsafeBytes { buffer in
                workload.verify(io) { UnsafeRawPointer(buffer.baseAddress! + (Int(io.sector) + $0) * 512) }
            }
        }
    }

    func workload(_ kind: WorkloadKind, bs: Int = 4096, sectors: UInt64 = 256, base: UInt64 = base,
                  configure: (inout WorkloadConfiguration) -> Void = { _ in }) throws -> Workload {
        var configuration = WorkloadConfiguration(kind: kind, blockSize: bs, queueDepth: 8)
        configuration.seed = 42
        configure(&configuration)
        return try Workload(configuration, diskSectors: sectors, sectorSize: 512, readOnly: false, generationBase: base)
    }

    /// Drives a workload to its end with `depth` I/Os in flight, completing the oldest first.
    func drive(_ workload: inout Workload, disk: RamDisk, depth: Int = 4) -> (ops: [PlannedIO], failures: Int) {
        var inFlight: [PlannedIO] = [], done: [PlannedIO] = [], failures = 0
        while !workload.finished {
            while inFlight.count < depth, let io = workload.next() { inFlight.append(io) }
            guard !inFlight.isEmpty else { continue }
            let io = inFlight.removeFirst()
            if io.operation == .write { disk.write(io) }
            if io.operation == .read { failures += disk.verify(io, with: workload) }
            workload.completed(io, success: true)
            done.append(io)
        }
        return (done, failures)
    }

    @Test func verifyWritesEveryBlockFlushesThenReadsEveryBlock() throws {
        var verify = try workload(.verify)
        let disk = RamDisk(sectors: 256)
        let (ops, failures) = drive(&verify, disk: disk)
        #expect(failures == 0)
        let writes = ops.filter { $0.operation == .write }, reads = ops.filter { $0.operation == .read }
        #expect(Set(writes.compactMap(\.block)) == Set(0..<32) && writes.count == 32)
        #expect(Set(reads.compactMap(\.block)) == Set(0..<32) && reads.count == 32)
        let flush = ops.firstIndex { $0.operation == .flush }!
        #expect(ops[..<flush].allSatisfy { $0.operation == .write } && ops[(flush + 1)...].allSatisfy { $0.operation == .read })
        #expect(Set(writes.map(\.generation)).count == 32 && writes.allSatisfy { $0.generation > Self.base })
    }

    @Test func lostWriteIsCaughtOnReadBack() throws {
        var verify = try workload(.verify)
        let disk = RamDisk(sectors: 256)
        var failures = 0
        while !verify.finished {
            guard let io = verify.next() else { continue }
            // The "backend" acknowledges the write of block 5 without doing it.
            if io.operation == .write && io.block != 5 { disk.write(io) }
            if io.operation == .read { failures += disk.verify(io, with: verify) }
            verify.completed(io, success: true)
        }
        #expect(failures == 8)  // every sector of the 4 KiB block
    }

    @Test(arguments: [(ReadCheck.all, 3), (.sample, 2)])
    func sampledCheckLooksAtEveryPagesFirstSectorAndTheLast(check: ReadCheck, caught: Int) throws {
        var verify = try workload(.verify, bs: 16384) { $0.readCheck = check }
        let disk = RamDisk(sectors: 256)
        var failures = 0
        while !verify.finished {
            guard let io = verify.next() else { continue }
            if io.operation == .write { disk.write(io) }
            if io.operation == .flush {
                // Block 0 is sectors 0-31: sector 3 lies inside page 0, 8 starts page 1, 31 ends the block.
                for sector in [3, 8, 31] { disk.bytes.replaceSubrange(sector * 512..<(sector + 1) * 512, with: repeatElement(0, count: 512)) }
            }
            if io.operation == .read { failures += disk.verify(io, with: verify) }
            verify.completed(io, success: true)
        }
        #expect(failures == caught)
    }

    @Test func misdirectedWriteIsCaught() throws {
        var verify = try workload(.verify)
        let disk = RamDisk(sectors: 256)
        var failures = 0
        while !verify.finished {
            guard let io = verify.next() else { continue }
            if io.operation == .write {
                var landed = io
                if io.block == 3 { landed.sector += 8 }  // block 3's data lands on block 4
                disk.write(landed)
            }
            if io.operation == .read { failures += disk.verify(io, with: verify) }
            verify.completed(io, success: true)
        }
        // Block 4 was overwritten after by its own write (sequential order), so only block 3 is wrong.
        #expect(failures == 8)
    }

    @Test func secondRunAcceptsTheFirstRunsStampsAndCatchesZeros() throws {
        let disk = RamDisk(sectors: 256)
        var first = try workload(.verify, base: 1_000)
        #expect(drive(&first, disk: disk).failures == 0)

        // A later run reads what the first wrote: earlier generations are right…
        var read = try workload(.read, base: 2_000_000) { $0.verifyExisting = true }
        #expect(drive(&read, disk: disk).failures == 0)

        // …but with --verify-existing zeros are not, and a stamp from the future never is.
        disk.bytes.replaceSubrange(0..<512, with: [UInt8](repeating: 0, count: 512))
        var again = try workload(.read, base: 2_000_000) { $0.verifyExisting = true }
        #expect(drive(&again, disk: disk).failures == 1)
        var early = try workload(.read, base: 500)
        #expect(drive(&early, disk: disk).failures == 255)  // the first run's stamps are "newer" than 500
    }

    @Test func randomWritesThenReadsAreCheckedExactly() throws {
        let disk = RamDisk(sectors: 256)
        var mixed = try workload(.randrw) { $0.bytes = 4096 * 400 }
        let (ops, failures) = drive(&mixed, disk: disk, depth: 8)
        #expect(failures == 0)
        #expect(ops.count == 400)
        #expect(ops.contains { $0.operation == .read } && ops.contains { $0.operation == .write })

        // Rewind one block to an older generation of this run: the next read of it fails.
        let stale = ops.last { $0.operation == .write }!
        var older = stale
        older.generation -= 1
        disk.write(older)
        let read = PlannedIO(operation: .read, block: stale.block, sector: stale.sector, sectorCount: 8, generation: 0)
        #expect(disk.verify(read, with: mixed) == 8)
    }

    @Test func failedWriteLeavesTheBlockUnknownButStillChecked() throws {
        var write = try workload(.write) { $0.bytes = 4096 }
        let io = write.next()!
        write.completed(io, success: false)
        let disk = RamDisk(sectors: 256)
        let read = PlannedIO(operation: .read, block: 0, sector: 0, sectorCount: 8, generation: 0)
        #expect(disk.verify(read, with: write) == 0)  // zeros: the write may not have happened
        disk.write(io)
        #expect(disk.verify(read, with: write) == 0)  // or it may have
        disk.bytes[100] ^= 1
        #expect(disk.verify(read, with: write) == 1)  // but garbage is never right
    }

    @Test func busyBlocksGetNoSecondIO() throws {
        var random = try workload(.randwrite, sectors: 32) { $0.seconds = 1 }  // 4 blocks
        var taken: [PlannedIO] = []
        for _ in 0..<50 { if let io = random.next() { taken.append(io) } }
        #expect(taken.count == 4)
        #expect(Set(taken.compactMap(\.block)).count == 4)
        random.completed(taken[2], success: true)
        var next: PlannedIO?
        for _ in 0..<100 where next == nil { next = random.next() }
        #expect(next?.block == taken[2].block)
    }

    @Test func sequentialWrapsAndByteBudgetEnds() throws {
        var read = try workload(.read, sectors: 64) { $0.bytes = 4096 * 20 }  // 8 blocks
        let (ops, _) = drive(&read, disk: RamDisk(sectors: 64), depth: 1)
        #expect(ops.map { $0.block! } == Array(0..<8) + Array(0..<8) + Array(0..<4))
    }

    @Test func oneRegionPassByDefaultAndOffsetsAreHonoured() throws {
        var write = try workload(.write, sectors: 256) { $0.offset = 8192; $0.size = 16384 }
        let (ops, _) = drive(&write, disk: RamDisk(sectors: 256), depth: 2)
        #expect(ops.map(\.sector) == [16, 24, 32, 40])
    }

    @Test func flushEveryNWrites() throws {
        var write = try workload(.write) { $0.flushEvery = 3; $0.bytes = 4096 * 9 }
        let (ops, _) = drive(&write, disk: RamDisk(sectors: 256), depth: 1)
        #expect(ops.map(\.operation.rawValue).joined(separator: ",")
            == "write,write,write,flush,write,write,write,flush,write,write,write,flush")
    }

    @Test func refusesWorkloadsThatDoNotFitTheDisk() {
        #expect(throws: WorkloadError.self) { try workload(.read, bs: 1000) }
        #expect(throws: WorkloadError.self) { try workload(.read) { $0.offset = 100 } }
        #expect(throws: WorkloadError.self) { try workload(.read) { $0.offset = 256 * 512 } }
        #expect(throws: WorkloadError.self) { try workload(.read, bs: 256 * 512 * 2) }
        #expect(throws: WorkloadError.self) {
            try Workload(WorkloadConfiguration(kind: .write), diskSectors: 256, sectorSize: 512, readOnly: true, generationBase: 1)
        }
        #expect(throws: WorkloadError.self) {
            try Workload(WorkloadConfiguration(kind: .read, blockSize: 512), diskSectors: 256, sectorSize: 4096,
                         readOnly: false, generationBase: 1)
        }
    }
}
