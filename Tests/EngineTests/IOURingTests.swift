@testable import DataPlane
import Engine
import Foundation
import Testing

@Suite struct IOURingTests {
    /// Waits on the ring's eventfd, as a worker does, until `count` completions are in.
    func awaitCompletions(_ ring: IOURing, count: Int) -> [UInt64: Int32] {
        var results: [UInt64: Int32] = [:]
        while results.count < count {
            // The deadline only ends a test whose completion never comes.
            var poller = pollfd(fd: ring.completionDescriptor, events: Int16(POLLIN), revents: 0)
            guard poll(&poller, 1, 60_000) == 1 else { break }
            ring.drainSignal()
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
        var results = awaitCompletions(ring, count: 2)
        #expect(results[1] == 4096)
        #expect(results[2] == 0)

        try withUnsafePointer(to: &vectors[1]) { try ring.read(descriptor, $0, count: 1, offset: 65536, tag: 3) }
        try ring.punchHole(descriptor, offset: 0, length: 4096, tag: 4)
        try ring.submit()
        results = awaitCompletions(ring, count: 2)
        #expect(results[3] == 4096)
        #expect(results[4] == 0)
        #expect(memcmp(page, page + 4096, 4096) == 0)
    }

    @Test func readOfABadDescriptorCompletesWithAnErrno() throws {
        let ring = try IOURing(entries: 2)
        var byte: UInt8 = 0
        try withUnsafeMutablePointer(to: &byte) { pointer in
            var vector = iovec(iov_base: pointer, iov_len: 1)
            try ring.read(-1, &vector, count: 1, offset: 0, tag: 9)
            try ring.submit()
        }
        #expect(awaitCompletions(ring, count: 1)[9] == -EBADF)
    }
}
