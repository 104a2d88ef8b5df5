import BlkbackClient
import Foundation
import Testing
import XenStoreTestSupport

/// Many open event streams and one that never reads: the rest of the API keeps answering,
/// and every other stream keeps its events.
@Suite(.serialized)
struct EventStreamLoadTests {
    /// A client that asks for the event stream and then reads only when told: connected from
    /// `source` (any 127.x address is loopback), with a small receive buffer when asked.
    static func openStream(port: UInt16, source: String, receiveBuffer: Int32? = nil) throws -> Int32 {
        let fd = try LoopbackSocket.connect(port: port, source: source, receiveBuffer: receiveBuffer)
        do {
            try LoopbackSocket.send(fd, "GET /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n")
        } catch {
            close(fd)
            throw error
        }
        return fd
    }

    static func residentKiB(_ pid: Int32) -> Int {
        let status = (try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)) ?? ""
        let line = status.split(separator: "\n").first { $0.hasPrefix("VmRSS:") } ?? ""
        return Int(line.split(separator: " ").dropFirst().first ?? "") ?? 0
    }

    @Test func aThousandOpenStreamsLeaveHealthAndMetricsAnswering() throws {
        let rig = try APIRig("events-1000", daemonArguments: ["--max-event-streams", "1000"])
        defer { rig.stop() }
        let before = Self.residentKiB(rig.daemon.pid)
        var streams: [Int32] = []
        defer { for fd in streams { close(fd) } }
        // 32 sources (the API allows 32 connections per client address) of up to 32 streams.
        for index in 0..<1000 {
            streams.append(try Self.openStream(port: rig.port, source: "127.0.0.\(2 + index / 32)"))
        }
        var readers = streams.map { ChunkedResponseReader(socket: $0) }
        var answered = 0
        for index in readers.indices where readers[index].read(until: { $0.contains("retry:") }) && readers[index].status == 200 {
            answered += 1
        }
        #expect(answered == 1000)
        let after = Self.residentKiB(rig.daemon.pid)
        print("1000 open event streams: daemon RSS \(before) KiB → \(after) KiB (\((after - before) * 1024 / 1000) bytes per stream)")

        let health = try rig.get("/healthz")
        #expect(health.status == 200)
        let metrics = try rig.get("/metrics")
        #expect(metrics.status == 200 && metrics.body.contains("blkback_reads_completed_total"))
        // One stream more than --max-event-streams: a JSON 503, and the rest stay.
        let refused = try rig.get("/v1/events")
        #expect(refused.status == 503 && refused.error?.contains("1000 event streams") == true, "\(refused.status) \(refused.body)")
        // An event reaches a stream opened first.
        #expect(try rig.request("PUT", APIRig.vbd + "/qos", body: Array(#"{"total_iops":700}"#.utf8)).status == 200)
        #expect(readers[0].read { $0.contains("\"total_iops\":700") } && readers[0].text.contains("event: qos-changed"))
    }

    @Test func aStreamThatNeverReadsIsCutOffAndTheOthersGetEveryEvent() async throws {
        let rig = try APIRig("events-stalled", daemonArguments: ["--event-queue", "16"])
        defer { rig.stop() }
        // A tiny receive window, never read: the daemon's writes stall and its queue fills.
        let stalled = try Self.openStream(port: rig.port, source: "127.0.0.2", receiveBuffer: 2048)
        defer { close(stalled) }
        let reader = try await EventReader(rig.base)
        let client = Client.blkback(url: URL(string: rig.base)!)
        // ~330 bytes an event: well over what the socket buffers (the daemon's fixed 64 KiB
        // send buffer, the client's smallest window) and the 16-event queue hold.
        let rounds = 1000
        let started = Date()
        for iops in 1...rounds {
            // A PUT is idempotent: one that lost its pooled connection is sent again, as HTTP
            // clients do (the stream may then carry that limit twice).
            for attempt in 1...3 {
                do {
                    _ = try await client.setVBDQoS(path: .init(domid: 1, devid: 51712), body: .json(.init(totalIops: iops)))
                    break
                } catch where attempt < 3 {
                    print("PUT qos \(iops), attempt \(attempt): \(error)")
                }
            }
        }
        print("\(rounds) qos-changed events published in \(String(format: "%.2f", Date().timeIntervalSince(started))) s")
        await reader.expectEvent("the last qos-changed") { $0.totalIops == rounds }
        let limits = await reader.events.filter { $0._type == .qosChanged }.compactMap(\.totalIops)
        let got = zip(limits, [0] + limits).filter { $0 != $1 }.map(\.0)
        #expect(got == Array(1...rounds), "the reading stream missed events: \(got.count) of \(rounds)")
        // Read what the stalled client was sent: it ends, cut off.
        var drained = ChunkedResponseReader(socket: stalled)
        #expect(drained.read { $0.contains("event: cut-off") }, "the stalled stream was not cut off: \(drained.text.suffix(300))")
        await reader.stop()
    }
}
