import API
import Engine
import Foundation
import Logging
import Testing
import XenStoreTestSupport

/// One event stream through the real HTTP server: every event arrives, in order, and the rate
/// one stream drains at is printed (a figure for the notes, never asserted).
struct EventStreamThroughputTests {
    final class EventsOnly: ManagedBackend, @unchecked Sendable {
        let events = VBDEventLog()
        var isWatching: Bool { true }
        func snapshots() -> [VBDSnapshot] { [] }
        func submit(_ command: VBDCommand, on selector: VBDSelector, timeout: Double,
                    answer: @escaping @Sendable (Result<VBDSnapshot, VBDCommandError>) -> Void) {
            answer(.failure(.unknownDevice))
        }
    }

    @Test func oneStreamCarriesEveryEventInOrder() throws {
        let backend = EventsOnly()
        var configuration = EventStreams.Configuration()
        configuration.queueCapacity = 1 << 20
        let api = ManagementAPI(backend: backend, token: nil, events: configuration)
        guard let (server, port) = try startLoopbackServer(api) else { Issue.record("no free port"); return }
        defer { server.stop() }

        let fd = try LoopbackSocket.connect(port: port)
        defer { close(fd) }
        try LoopbackSocket.send(fd, "GET /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        // The stream is attached once its prelude arrives.
        var response = ChunkedResponseReader(socket: fd)
        guard response.read(until: { $0.contains("retry:") }), response.status == 200 else { Issue.record("no prelude"); return }

        let total = 200_000
        let vbd = VBDIdentity(kind: "vbd", domid: .dom0, devid: 51712)
        let started = DispatchTime.now().uptimeNanoseconds
        let producer = Thread {
            for i in 0..<total { backend.events.publish(.qosChanged, vbd, [("total_iops", .number(UInt64(i)))]) }
        }
        producer.start()
        // Count `id:` lines, checking they run 1, 2, 3, ...
        var expected: UInt64 = 1, bytes = 0, carry = ""
        let deadline = Date().addingTimeInterval(600)
        while expected <= UInt64(total) {
            guard let more = response.next(deadline: deadline) else { break }
            bytes += more.count
            let lines = (carry + String(decoding: more, as: UTF8.self)).split(separator: "\n", omittingEmptySubsequences: false)
            carry = String(lines.last ?? "")
            for line in lines.dropLast() where line.hasPrefix("id: ") {
                guard UInt64(line.dropFirst(4)) == expected else { Issue.record("got \(line), expected id \(expected)"); return }
                expected += 1
            }
        }
        let seconds = Double(DispatchTime.now().uptimeNanoseconds - started) / 1e9
        #expect(expected == UInt64(total) + 1, "the stream ended after \(expected - 1) of \(total) events")
        print("one event stream: \(total) events, \(bytes / total) bytes each, in \(String(format: "%.2f", seconds)) s = \(Int(Double(total) / seconds)) events/s")
    }
}
