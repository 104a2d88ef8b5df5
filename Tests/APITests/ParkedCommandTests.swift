import API
import Engine
import Foundation
import Testing
import XenStoreTestSupport

/// State commands wait for the control-plane thread with their connection parked: however
/// many wait, and however long, /healthz and /metrics keep answering on the server's 4
/// threads, and every waiting command gets its answer.
struct ParkedCommandTests {
    /// Holds every command until released (a control plane stuck on a slow store).
    final class HoldingBackend: ManagedBackend, @unchecked Sendable {
        let events = VBDEventLog()
        var isWatching: Bool { true }
        private let held = Locked<[@Sendable (Result<VBDSnapshot, VBDCommandError>) -> Void]>([])
        func snapshots() -> [VBDSnapshot] { [] }
        func submit(_ command: VBDCommand, on selector: VBDSelector, timeout: Double,
                    answer: @escaping @Sendable (Result<VBDSnapshot, VBDCommandError>) -> Void) {
            held.withLock { $0.append(answer) }
        }
        var heldCount: Int { held.withLock { $0.count } }
        func release() {
            for answer in held.withLock({ answers in defer { answers = [] }; return answers }) {
                answer(.failure(.conflict("released by the test")))
            }
        }
    }

    static func postState(_ port: UInt16) throws -> Int32 {
        let fd = try LoopbackSocket.connect(port: port)
        let body = #"{"state":"closing"}"#
        try LoopbackSocket.send(fd, "POST /v1/vbds/1/51712/state HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                                    + "Content-Length: \(body.utf8.count)\r\n\r\n\(body)")
        return fd
    }

    @Test func waitingCommandsHoldNoThreadAndAreAllAnswered() throws {
        let backend = HoldingBackend()
        let api = ManagementAPI(backend: backend, token: nil)
        guard let (server, port) = try startLoopbackServer(api) else { Issue.record("no free port"); return }
        defer { server.stop() }
        #expect(server.configuration.threads == 4)

        // Four times as many waiting commands as the server has threads.
        var waiting: [Int32] = []
        defer { for fd in waiting { close(fd) } }
        for _ in 0..<16 { waiting.append(try Self.postState(port)) }
        var polls = 0
        while backend.heldCount < 16 && polls < 1000 {
            usleep(10_000)
            polls += 1
        }
        #expect(backend.heldCount == 16)

        let health = try LoopbackSocket.exchange(port: port, "GET", "/healthz", timeout: 10)
        #expect(health.status == 200, "\(health.text)")
        let metrics = try LoopbackSocket.exchange(port: port, "GET", "/metrics", timeout: 10)
        #expect(metrics.status == 200)

        backend.release()
        for fd in waiting {
            let answer = LoopbackSocket.readResponse(fd)
            #expect(answer.status == 409 && answer.text.contains("released by the test"), "\(answer.text)")
        }
    }

    @Test func aStopAnswersWaitingCommands() throws {
        let backend = HoldingBackend()
        let api = ManagementAPI(backend: backend, token: nil)
        guard let (server, port) = try startLoopbackServer(api) else { Issue.record("no free port"); return }
        let fd = try Self.postState(port)
        defer { close(fd) }
        var polls = 0
        while backend.heldCount < 1 && polls < 1000 {
            usleep(10_000)
            polls += 1
        }
        server.stop()
        let answer = LoopbackSocket.readResponse(fd)
        #expect(answer.status == 503 && answer.text.contains("stopping"), "\(answer.text)")
        // The control plane's answer after the stop goes nowhere.
        backend.release()
    }

    @Test func onlyTheFirstAnswerCounts() throws {
        let deferred = HTTPDeferredResponse()
        deferred.complete(ManagementAPI.errorResponse(409, "first"))
        deferred.complete(ManagementAPI.errorResponse(503, "second"))
        #expect(deferred.completed?.status == 409)
    }
}
