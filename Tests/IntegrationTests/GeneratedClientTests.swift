import BlkbackClient
import Foundation
import OpenAPIRuntime
import Testing

/// The API through the client generated from openapi.yaml: every answer must decode as the
/// spec describes it, so the spec and the server cannot drift apart without these failing.
@Suite(.serialized)
struct GeneratedClientTests {
    static let xvda = Operations.GetVBD.Input.Path(domid: 1, devid: 51712)

    @Test func everyOperationAnswersAsTheSpecSays() async throws {
        let rig = try APIRig("client-ops")
        defer { rig.stop() }
        let client = Client.blkback(url: URL(string: rig.base)!)
        try rig.startGuest()
        #expect(try eventually { try rig.isConnected() })

        guard case .ok(let health) = try await client.health() else { Issue.record("healthz"); return }
        #expect(try health.body.json.status == .ok)
        guard case .ok(let list) = try await client.listVBDs() else { Issue.record("listVBDs"); return }
        let vbds = try list.body.json.vbds
        #expect(vbds.count == 1 && vbds[0].backendState == .connected && vbds[0].ioMode != nil)
        guard case .ok(let one) = try await client.getVBD(path: Self.xvda) else { Issue.record("getVBD"); return }
        #expect(try one.body.json.target == rig.disk)
        #expect(try eventually { try rig.stats()["rd_req"]! > 0 })
        guard case .ok(let stats) = try await client.getVBDStats(path: .init(domid: 1, devid: 51712)) else { Issue.record("stats"); return }
        #expect(try stats.body.json.rdReq > 0)

        guard case .ok(let set) = try await client.setVBDQoS(path: .init(domid: 1, devid: 51712), body: .json(.init(totalIops: 50_000))) else {
            Issue.record("setVBDQoS"); return
        }
        #expect(try set.body.json.totalIops == 50_000)
        guard case .ok(let got) = try await client.getVBDQoS(path: .init(domid: 1, devid: 51712)) else { Issue.record("getVBDQoS"); return }
        #expect(try got.body.json.totalIops == 50_000)
        guard case .accepted(let resized) = try await client.resizeVBD(path: .init(domid: 1, devid: 51712)) else { Issue.record("resize"); return }
        #expect(try resized.body.json.sectors == 64 << 11)
        guard case .ok(let metrics) = try await client.metrics() else { Issue.record("metrics"); return }
        let exposition = try await String(collecting: try metrics.body.plainText, upTo: 1 << 20)
        #expect(exposition.contains("blkback_reads_completed_total{"))

        // Documented failures decode too.
        guard case .notFound(let missing) = try await client.getVBD(path: .init(domid: 1, devid: 51713)) else { Issue.record("404"); return }
        #expect(try missing.body.json.error.contains("1/51713"))
        guard case .accepted(let closed) = try await client.setVBDState(path: .init(domid: 1, devid: 51712), body: .json(.init(state: .closed))) else {
            Issue.record("state closed"); return
        }
        // Closing while the guest's requests drain, then Closed.
        #expect(try [.closing, .closed].contains(closed.body.json.backendState))
        #expect(try eventually { try rig.backendState() == "Closed" })
        guard case .conflict(let again) = try await client.setVBDState(path: .init(domid: 1, devid: 51712), body: .json(.init(state: .closed))) else {
            Issue.record("state closed twice must be 409"); return
        }
        #expect(try !again.body.json.error.isEmpty)
    }

    @Test func theEventStreamFollowsAVBDFromAttachToDetachWithoutPolling() async throws {
        let rig = try APIRig("client-events", attach: false)
        defer { rig.stop() }
        let events = try await EventReader(rig.base, query: .init(domid: 1))

        #expect(try rig.sim.xensim(["domain", "create"], ["--domid", "1"]).status == 0)
        #expect(try rig.sim.xensim(["attach"], ["--domid", "1", "--devid", "51712", "--target", rig.disk]).status == 0)
        try rig.startGuest()
        await events.expectEvent("connected") { $0._type == .connected }
        let client = Client.blkback(url: URL(string: rig.base)!)
        guard case .accepted = try await client.setVBDState(path: .init(domid: 1, devid: 51712), body: .json(.init(state: .closed))) else {
            Issue.record("state closed"); return
        }
        await events.expectEvent("backend Closed") { $0._type == .backendState && $0.state == "Closed" }
        _ = rig.stopGuest()
        #expect(try rig.sim.xensim(["detach"], ["--domid", "1", "--devid", "51712"]).status == 0)
        await events.expectEvent("vbd-removed") { $0._type == .vbdRemoved }

        // Each step, in order, with ids one apart.
        let seen = await events.events
        let summary = await events.summary
        let steps = ["vbd-added", "backend-state:InitWait", "backend-state:Connected", "connected", "backend-state:Closed", "vbd-removed"]
        var remaining = steps[...]
        for event in seen where remaining.first.map({ $0 == event._type.rawValue || $0 == "\(event._type.rawValue):\(event.state ?? "")" }) == true {
            remaining = remaining.dropFirst()
        }
        #expect(remaining.isEmpty, "missing \(Array(remaining)) in \(summary)")
        #expect(zip(seen, seen.dropFirst()).allSatisfy { $1.id == $0.id + 1 }, "\(summary)")
        #expect(seen.allSatisfy { $0.domid == 1 && $0.devid == 51712 && $0.kind == "vbd" })
        if let connected = seen.first(where: { $0._type == .connected }) {
            #expect(connected._protocol != nil && connected.queues == 1 && connected.sectors == 64 << 11)
        }
        await events.stop()
    }

    @Test func aHostileGuestShowsAsErrorAndHaltEvents() async throws {
        let rig = try APIRig("client-hostile")
        defer { rig.stop() }
        let events = try await EventReader(rig.base, query: .init(domid: 1))
        // Requests naming a grant the guest never gave: error responses, reported once a second.
        let refused = try rig.sim.xensim(["attack"], ["--domid", "1", "--devid", "51712", "--name", "bad-grant-ref"])
        #expect(refused.status == 0, "\(refused.stdout) \(refused.stderr)")
        await events.expectEvent("io-error") { $0._type == .ioError && ($0.count ?? 0) >= 1 && $0.status == "error" }
        // A producer index beyond the ring: the ring is halted, and the stream says so.
        let overflow = try rig.sim.xensim(["attack"], ["--domid", "1", "--devid", "51712", "--name", "ring-index-overflow"])
        #expect(overflow.status == 0, "\(overflow.stdout) \(overflow.stderr)")
        await events.expectEvent("ring-halted") { $0._type == .ringHalted && $0.reason?.contains("protocol") == true && $0.queue == 0 }
        // The device stays Connected (until the attacker closes it), and says so: the VBD's
        // error and the error node (stats and /metrics count it while it is connected:
        // HaltedRingTests).
        #expect(try eventually { (try rig.get(APIRig.vbd).json?["error"] as? String)?.contains("ring halted: queue 0") == true })
        let node = try rig.sim.xenstore("xenstore-read", ["/local/domain/0/error/backend/vbd/1/51712/error"])
        #expect(node.stdout.hasPrefix("71 ring halted: queue 0: frontend broke the ring protocol"), "\(node.stdout)")
        await events.stop()
    }

    @Test func streamsResumeFromLastEventIDFilterAndRefuseBadArguments() async throws {
        let rig = try APIRig("client-resume")
        defer { rig.stop() }
        let client = Client.blkback(url: URL(string: rig.base)!)
        for iops in 1...5 {
            _ = try await client.setVBDQoS(path: .init(domid: 1, devid: 51712), body: .json(.init(totalIops: iops * 100)))
        }
        // From the start: everything so far, in order.
        let all = try await EventReader(rig.base, lastEventID: 0)
        await all.expectEvent("qos 500") { $0._type == .qosChanged && $0.totalIops == 500 }
        let ids = await all.events.map(\.id)
        #expect(ids == Array(1...ids.count), "\(ids)")
        // After the third qos-changed event: the last two only.
        let third = await all.events.filter { $0._type == .qosChanged }[2].id
        let resumed = try await EventReader(rig.base, lastEventID: third)
        await resumed.expectEvent("qos 500") { $0.totalIops == 500 }
        let resumedIOPS = await resumed.events.map(\.totalIops)
        #expect(resumedIOPS == [400, 500])
        // Another domain's stream sees none of it, and a live event reaches the open streams.
        let other = try await EventReader(rig.base, query: .init(domid: 2))
        _ = try await client.setVBDQoS(path: .init(domid: 1, devid: 51712), body: .json(.init(totalIops: 600)))
        await all.expectEvent("qos 600") { $0.totalIops == 600 }
        await resumed.expectEvent("qos 600") { $0.totalIops == 600 }
        let otherEvents = await other.events
        #expect(otherEvents.isEmpty)
        for reader in [all, resumed, other] { await reader.stop() }

        // Bad arguments: JSON 400s, never a stream.
        for path in ["/v1/events?domid=x", "/v1/events?domid=40000", "/v1/events?kind=VBD", "/v1/events?since=3"] {
            let answer = try rig.get(path)
            #expect(answer.status == 400 && answer.error != nil, "\(path): \(answer.status) \(answer.body)")
        }
        let badID = try rig.get("/v1/events", headers: ["Last-Event-ID: seven"])
        #expect(badID.status == 400 && badID.error?.contains("Last-Event-ID") == true)
        let wrongMethod = try rig.post("/v1/events", "{}")
        #expect(wrongMethod.status == 405)
    }
}

/// Reads one event stream in the background; tests wait on what it received.
actor EventReader {
    private(set) var events: [Components.Schemas.Event] = []
    private(set) var other: [String] = []
    private var task: Task<Void, Never>?

    init(_ base: String, query: Operations.WatchEvents.Input.Query = .init(), lastEventID: Int? = nil) async throws {
        let client = Client.blkback(url: URL(string: base)!, timeout: .seconds(600))
        guard case .ok(let ok) = try await client.watchEvents(query: query, headers: .init(lastEventID: lastEventID)) else {
            throw HarnessError("GET /v1/events did not answer 200")
        }
        let body = try ok.body.textEventStream
        task = Task { [weak self] in
            do {
                for try await item in body.vbdStreamItems() {
                    await self?.received(item)
                }
            } catch {
                await self?.note("stream ended: \(error)")
            }
        }
    }

    private func received(_ item: VBDStreamItem) {
        switch item {
        case .event(let event): events.append(event)
        case .eventsLost(let data): other.append("events-lost \(data)")
        case .cutOff(let data): other.append("cut-off \(data)")
        }
    }

    private func note(_ text: String) { other.append(text) }

    /// Waits until an event matching `condition` came (the deadline only ends a test whose
    /// event never comes).
    func wait(timeout: TimeInterval = 60, _ condition: (Components.Schemas.Event) -> Bool) async -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if events.contains(where: condition) { return true }
            try? await Task.sleep(for: .milliseconds(20))
        }
        return false
    }

    /// `wait`, recording an issue with everything received when the event never comes.
    func expectEvent(_ what: String, _ condition: (Components.Schemas.Event) -> Bool) async {
        if !(await wait(condition)) { Issue.record("no \(what) event; received: \(summary)") }
    }

    var summary: String {
        (events.map { "\($0.id) \($0._type.rawValue) \($0.state ?? "")" } + other).joined(separator: "; ")
    }

    func stop() {
        task?.cancel()
    }
}
