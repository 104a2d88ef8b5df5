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
        func perform(_ command: VBDCommand, on selector: VBDSelector, timeout: Double) -> Result<VBDSnapshot, VBDCommandError> {
            .failure(.unknownDevice)
        }
    }

    @Test func oneStreamCarriesEveryEventInOrder() throws {
        let backend = EventsOnly()
        var configuration = EventStreams.Configuration()
        configuration.queueCapacity = 1 << 20
        let api = ManagementAPI(backend: backend, token: nil, events: configuration)
        var server: HTTPServer?
        var port: UInt16 = 0
        for _ in 0..<5 where server == nil {
            let candidate = UInt16.random(in: 20000...60000)
            let attempt = HTTPServer(configuration: .init(address: try ListenAddress("127.0.0.1:\(candidate)")),
                                     logger: Logger(label: "test"), tooLarge: { _ in ManagementAPI.errorResponse(413, "too large") },
                                     handler: { api.respond($0) })
            if (try? attempt.start()) != nil { (server, port) = (attempt, candidate) }
        }
        guard let server else { Issue.record("no free port"); return }
        defer { server.stop() }

        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = port.bigEndian
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        #expect(connected == 0)
        let request = "GET /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        #expect(write(fd, request, request.utf8.count) == request.utf8.count)
        var timeout = timeval(tv_sec: 30, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
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
