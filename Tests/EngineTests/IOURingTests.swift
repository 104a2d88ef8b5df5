@testable import DataPlane
import Engine
import Foundation
import Testing

@Suite struct IOURingTests {
    /// Waits in the ring, as a worker does, until `count` completions are in.
    func awaitCompletions(_ ring: IOURing, count: Int) throws -> [UInt64: Int32] {
        var results: [UInt64: Int32] = [:]
        while results.count < count {
            // The deadline only ends a test whose completion never comes.
            guard try ring.submitAndWait(minimum: 1, milliseconds: 60_000) else { break }
            ring.reapCompletions { results[$0.tag] = $0.result }
        }
        return results
    }

    @Test func writeReadFlushAndPunchHoleOnARealFile() throws {
        let path = NSTemporaryDirectory() + "uring-\(UUID().uuidString)"
        let descriptor = open(path, O_RDWR | O_CREAT | O_TRUNC, 0o600)
        #expect(descriptor >= 0)
        defer { close(descriptor); unlink(path) }
        #expect(ftruncate(descriptor, 1 << 20) == 0)

        let ring = try IOURing(entries: 8)
        let page = UnsafeMutableRawPointer.allocate(byteCount: 8192, alignment: 4096)
        defer { page.deallocate() }
        memset(page, 0x5A, 4096)
        memset(page + 4096, 0x00, 4096)
        var vectors = [iovec(iov_base: page, iov_len: 4096), iovec(iov_base: page + 4096, iov_len: 4096)]

        try ring.write(descriptor, &vectors, count: 1, offset: 65536, tag: 1)
        try ring.flush(descriptor, tag: 2)
        try ring.submit()
        var results = try awaitCompletions(ring, count: 2)
        #expect(results[1] == 4096)
        #expect(results[2] == 0)

        try withUnsafePointer(to: &vectors[1]) { try ring.read(descriptor, $0, count: 1, offset: 65536, tag: 3) }
        try ring.punchHole(descriptor, offset: 0, length: 4096, tag: 4)
        try ring.submit()
        results = try awaitCompletions(ring, count: 2)
        #expect(results[3] == 4096)
        #expect(results[4] == 0)
        #expect(memcmp(page, page + 4096, 4096) == 0)
    }

    @Test func aWatchedDescriptorCompletesEachTimeItBecomesReadable() throws {
        let ring = try IOURing(entries: 4)
        var ends: [Int32] = [-1, -1]
        #expect(pipe(&ends) == 0)
        defer { close(ends[0]); close(ends[1]) }
        try ring.watch(ends[0], tag: 7)
        #expect(try ring.submitAndWait(minimum: 1, milliseconds: 10) == false, "nothing readable yet")
        for round in 1...3 {
            var one: UInt64 = 1
            #expect(write(ends[1], &one, 8) == 8)
            var fired: [IOURing.Completion] = []
            while fired.isEmpty {
                guard try ring.submitAndWait(minimum: 1, milliseconds: 60_000) else { break }
                ring.reapCompletions { fired.append($0) }
            }
            #expect(fired.count == 1 && fired[0].tag == 7 && fired[0].more, "round \(round): \(fired)")
            var count: UInt64 = 0
            #expect(read(ends[0], &count, 8) == 8)
        }
    }

    @Test func readOfABadDescriptorCompletesWithAnErrno() throws {
        let ring = try IOURing(entries: 2)
        var byte: UInt8 = 0
        try withUnsafeMutablePointer(to: &byte) { pointer in
            var vector = iovec(iov_base: pointer, iov_len: 1)
            try ring.read(-1, &vector, count: 1, offset: 0, tag: 9)
            try ring.submit()
        }
        #expect(try awaitCompletions(ring, count: 1)[9] == -EBADF)
    }
}
