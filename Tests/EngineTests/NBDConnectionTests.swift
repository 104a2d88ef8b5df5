import Foundation
import NBD
import Testing

/// The libnbd wrapper against a real nbdkit (memory plugin) on a unix socket.
@Suite struct NBDConnectionTests {
    /// A read notification with nothing to read (what a stale io_uring poll result reports)
    /// must not leave libnbd waiting in REPLY.START: a command issued then would only be
    /// queued, and with no other command out it would never be sent.
    @Test func aReadNotificationWithNothingToReadDoesNotHoldBackTheNextCommand() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("nbd-connection-\(getpid())-\(UInt32.random(in: 0...UInt32.max))")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let socket = directory.appendingPathComponent("nbd.sock").path
        let server = Process()
        server.executableURL = URL(fileURLWithPath: "/usr/bin/env")   // execs nbdkit: the same process
        server.arguments = ["nbdkit", "--foreground", "--exit-with-parent", "--unix", socket, "memory", "size=1M"]
        try server.run()
        defer {
            kill(server.processIdentifier, SIGKILL)   // nbdkit would wait for its client to leave
            server.waitUntilExit()
        }

        for _ in 0..<500 where access(socket, F_OK) != 0 { usleep(10_000) }
        let connection = try NBDConnection(name: "test")
        try connection.connect(uri: "nbd+unix:///?socket=\(socket)", timeout: 10)

        try connection.notify(.read)   // nothing in flight, nothing to read
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { buffer.deallocate() }
        let cookie = try connection.read(into: buffer, count: 4096, offset: 0)
        // Bounded only so that a regression fails instead of hanging.
        var answer: (cookie: UInt64, error: Int32)?
        for _ in 0..<50 where answer == nil {
            try connection.notify(try connection.readiness(of: connection.direction.union(.read), withinMilliseconds: 100))
            answer = connection.retireCompleted()
        }
        #expect(answer?.cookie == cookie)
        #expect(answer?.error == 0)
    }
}
