import Foundation
import Testing
import XenStoreTestSupport

/// The HTTP API of a running blkback-server on the simulator, through curl.
@Suite(.serialized) struct APITests {
    @Test func endpointsAnswerPerTheContract() throws {
        let rig = try APIRig("api")
        defer { rig.stop() }
        try rig.startGuest()

        let health = try rig.get("/healthz")
        #expect(health.status == 200 && health.body == "{\"status\":\"ok\"}\n", "\(health)")
        #expect(health.headers["content-type"] == "application/json")

        #expect(try eventually { try rig.isConnected() }, "daemon: \(rig.daemon.output)")
        let list = try rig.get("/v1/vbds")
        #expect(list.status == 200)
        let vbds = try #require(list.json?["vbds"] as? [[String: Any]])
        #expect(vbds.count == 1)
        let vbd = try #require(vbds.first)
        #expect(vbd["domid"] as? Int == 1 && vbd["devid"] as? Int == 51712 && vbd["kind"] as? String == "vbd")
        #expect(vbd["frontend_state"] as? String == "Connected")
        #expect(vbd["target"] as? String == rig.disk)
        #expect(vbd["sectors"] as? Int == (64 << 20) / 512)
        #expect(vbd["mode"] as? String == "w" && vbd["protocol"] as? String == "x86_64-abi")
        for key in ["backend_path", "frontend_path", "sector_size", "physical_sector_size", "queues", "ring_page_order",
                    "persistent_grants", "max_indirect_segments", "features"] {
            #expect(vbd[key] != nil, "VBD lacks \(key)")
        }
        // The demo guest asks for persistent grants and the simulator unmaps synchronously.
        #expect(vbd["persistent_grants"] as? Bool == true && vbd["io_mode"] as? String == "direct-persistent")

        // Counters grow while the guest works.
        let first = try rig.stats()
        #expect(try eventually {
            let now = try rig.stats()
            return now["rd_req"]! + now["wr_req"]! > first["rd_req"]! + first["wr_req"]!
        })
        #expect(Set(first.keys) == ["rd_req", "wr_req", "f_req", "ds_req", "oo_req", "rd_sect", "wr_sect", "errors", "inflight",
                                 "persistent_grants", "halted_rings", "spurious_events", "grant_cap_copied", "qos_delayed", "qos_throttled_ms",
                                 "store_waiting_rings", "store_reconnects"])

        // Pretty on request; HEAD where GET is allowed.
        #expect(try rig.get(APIRig.vbd + "?pretty").body.contains("\n  \"domid\": 1,\n"))
        #expect(try rig.get(APIRig.vbd, headers: ["Accept: text/plain"]).body.contains("\n  \"domid\": 1,\n"))
        let head = try rig.request("HEAD", "/v1/vbds")
        #expect(head.status == 200 && head.body.isEmpty)

        let metrics = try rig.get("/metrics")
        #expect(metrics.status == 200 && metrics.headers["content-type"]?.hasPrefix("text/plain; version=0.0.4") == true)
        #expect(metrics.body.contains(#"blkback_vbd_state{domid="1",devid="51712",kind="vbd"} 4"#))

        // Errors: JSON, one line, the right 4xx.
        let unknownPath = try rig.get("/v2/nothing")
        #expect(unknownPath.status == 404 && unknownPath.error != nil)
        #expect(try rig.get("/healthz%00x").status == 404)   // a NUL does not cut the path short
        #expect(try rig.get("/v1/vb%64s").status == 200)     // percent-decoded otherwise
        let unknownVBD = try rig.get("/v1/vbds/7/51712/stats")
        #expect(unknownVBD.status == 404 && unknownVBD.error != nil)
        let badNumber = try rig.get("/v1/vbds/one/51712")
        #expect(badNumber.status == 400 && badNumber.error != nil)
        let wrongMethod = try rig.request("DELETE", APIRig.vbd)
        #expect(wrongMethod.status == 405 && wrongMethod.headers["allow"] == "GET, HEAD" && wrongMethod.error != nil)
        let getState = try rig.get(APIRig.vbd + "/state")
        #expect(getState.status == 405 && getState.headers["allow"] == "POST")

        #expect(rig.stopGuest().status == 0)
    }

    @Test func hostileBodiesAreRefusedCleanly() throws {
        let rig = try APIRig("api-bodies")
        defer { rig.stop() }
        let state = APIRig.vbd + "/state"

        // 10 MiB: refused from Content-Length, and again when sent chunked (no length).
        let huge = [UInt8](repeating: UInt8(ascii: "a"), count: 10 << 20)
        let declared = try rig.request("POST", state, body: huge, headers: ["Content-Type: application/json"])
        #expect(declared.status == 413 && declared.error != nil, "\(declared.status) \(declared.body)")
        let chunked = try rig.request("POST", state, body: huge, headers: ["Content-Type: application/json", "Transfer-Encoding: chunked"])
        #expect(chunked.status == 413 && chunked.error != nil, "\(chunked.status) \(chunked.body)")

        let invalidUTF8: [UInt8] = Array(#"{"state":"clos"#.utf8) + [0xFF, 0xFE] + Array(#"ing"}"#.utf8)
        let deep = String(repeating: "[", count: 10_000) + String(repeating: "]", count: 10_000)
        let cases: [(String, [UInt8])] = [
            ("invalid UTF-8", invalidUTF8),
            ("deep nesting", Array(deep.utf8)),
            ("duplicate keys", Array(#"{"state":"closing","state":"closed"}"#.utf8)),
            ("trailing garbage", Array(#"{"state":"closing"}garbage"#.utf8)),
            ("wrong type", Array(#"{"state":5}"#.utf8)),
            ("unknown state", Array(#"{"state":"open"}"#.utf8)),
            ("not an object", Array(#"["closing"]"#.utf8)),
            ("empty", []),
        ]
        for (name, body) in cases {
            let answer = try rig.request("POST", state, body: body, headers: ["Content-Type: application/json"])
            #expect(answer.status == 400, "\(name): \(answer.status) \(answer.body)")
            #expect(answer.error.map { !$0.contains("\n") } == true, "\(name): \(answer.body)")
        }
        // The daemon is still serving.
        #expect(try rig.get("/healthz").status == 200)
        #expect(try rig.backendState() == "InitWait")
    }

    @Test func stateCommandsCloseAndReconnectARunningGuest() throws {
        let rig = try APIRig("api-state")
        defer { rig.stop() }
        try rig.startGuest()
        #expect(try eventually { try rig.isConnected() })
        let state = APIRig.vbd + "/state"

        #expect(try rig.post(state, #"{"state":"reconnect"}"#).status == 409)   // Connected

        // closing: the backend goes Closing, the guest answers Closed, the backend follows.
        let closing = try rig.post(state, #"{"state":"closing"}"#)
        #expect(closing.status == 202 && closing.json?["backend_state"] as? String == "Closing", "\(closing.body)")
        #expect(try eventually { try rig.backendState() == "Closed" })
        let again = try rig.post(state, #"{"state":"closing"}"#)
        #expect(again.status == 409 && again.error != nil)
        #expect(try rig.post(state, #"{"state":"closed"}"#).status == 409)

        // reconnect: InitWait; the guest renegotiates by itself and its I/O resumes.
        var reconnect = HTTPExchange(status: 0, headers: [:], body: "")
        #expect(try eventually {
            reconnect = try rig.post(state, #"{"state":"reconnect"}"#)   // 409 while the rings drain
            return reconnect.status == 202
        }, "\(reconnect.body)")
        #expect(try eventually { try rig.isConnected() })
        #expect(try eventually { try rig.stats()["rd_req"]! > 0 })

        // closed: Closed at once, or Closing at once and Closed when the requests in flight
        // are answered; reconnect once the guest has closed its side.
        let closed = try rig.post(state, #"{"state":"closed"}"#)
        #expect(closed.status == 202 && ["Closing", "Closed"].contains(closed.json?["backend_state"] as? String), "\(closed.body)")
        #expect(try eventually { try rig.backendState() == "Closed" })
        #expect(try eventually {
            try rig.post(state, #"{"state":"reconnect"}"#).status == 202
        })
        #expect(try eventually { try rig.isConnected() })
        let before = try rig.stats()
        #expect(try eventually { try rig.stats()["wr_req"]! > before["wr_req"]! })

        let (status, report) = rig.stopGuest()
        #expect(status == 0, "guest: \(String(describing: report))")
        #expect(report?["verify_failures"] as? Int == 0)
        #expect(report?["errors"] as? Int == 0)
        #expect((report?["reconnects"] as? Int ?? 0) >= 2)

        // A device the toolstack is removing (online=0) is not offered again.
        #expect(try eventually { try rig.backendState() == "Closed" })
        let offline = try rig.sim.xenstore("xenstore-write", ["/local/domain/0/backend/vbd/1/51712/online", "0"])
        #expect(offline.status == 0)
        let refused = try rig.post(state, #"{"state":"reconnect"}"#)
        #expect(refused.status == 409 && refused.error?.contains("online=0") == true, "\(refused.body)")

        let unknown = try rig.post("/v1/vbds/1/51713/state", #"{"state":"closing"}"#)
        #expect(unknown.status == 404)
    }

    /// A frontend that sees Closed takes its pages back: Closed must never be written while
    /// requests are in flight (their grants still mapped). QoS holds a guest's requests
    /// back so that a forced close finds them in flight.
    @Test func closedIsWrittenOnlyOnceNothingIsInFlight() throws {
        let rig = try APIRig("closed-after-drain")
        defer { rig.stop() }
        #expect(try rig.request("PUT", APIRig.vbd + "/qos", body: Array(#"{"total_iops":40,"burst_seconds":1}"#.utf8)).status == 200)
        // The device stays Closed: the guest gives up waiting for it soon and reports.
        try rig.startGuest(seconds: 120, ["--reconnect-timeout", "2"])
        #expect(try eventually { try rig.isConnected() && (try rig.stats()["inflight"] ?? 0) > 8 })
        let closed = try rig.post(APIRig.vbd + "/state", #"{"state":"closed"}"#)
        // Requests held back by QoS are in flight: Closing now, Closed once they are answered.
        // A stop lets held requests go at once, so on a loaded machine they may all have been
        // answered before the command returned: Closed at once is right then; the guest's
        // count below says whether Closed ever came while its pages were still mapped.
        let answer = closed.json?["backend_state"] as? String
        #expect(closed.status == 202 && ["Closing", "Closed"].contains(answer), "\(closed.body)")
        var samples = 0, violations: [String] = []
        #expect(try eventually {
            // The state first: once it says Closed, nothing may be in flight any more.
            let state = try rig.backendState()
            let inflight = try rig.stats()["inflight"] ?? -1
            samples += 1
            if state == "Closed", inflight != 0 { violations.append("Closed with \(inflight) in flight") }
            return state == "Closed"
        })
        #expect(violations.isEmpty, "\(violations)")
        print("closed-after-drain: answered \(answer ?? "-"), \(samples) samples until Closed")
        let (_, report) = rig.stopGuest()
        #expect(report?["verify_failures"] as? Int ?? 0 == 0)
        #expect(report?["grants_mapped_at_closed"] as? Int == 0, "\(String(describing: report))")
    }

    @Test func qosLimitsAreSetLiveKeptInXenstoreAndHoldRequestsBack() throws {
        let rig = try APIRig("qos")
        defer { rig.stop() }
        let qos = APIRig.vbd + "/qos"
        let backend = "/local/domain/0/backend/vbd/1/51712"
        // A toolstack's keys are the limits at connect.
        #expect(try rig.sim.xenstore("xenstore-write", ["\(backend)/qos-read-iops", "300"]).status == 0)
        try rig.startGuest()
        #expect(try eventually { try rig.isConnected() }, "daemon: \(rig.daemon.output)")
        #expect(try rig.get(qos).json?["read_iops"] as? Int == 300)
        // Over the limit the guest's reads wait; none fails.
        #expect(try eventually { (try rig.stats()["qos_delayed"] ?? 0) > 0 }, "no request was held back")

        // PUT replaces every limit: the answer and GET are the limits in force, the keys follow.
        let put = try rig.request("PUT", qos, body: Array(#"{"total_iops": 400, "write_bytes_per_second": 1048576}"#.utf8))
        #expect(put.status == 200, "\(put.body)")
        #expect(put.json?["total_iops"] as? Int == 400 && put.json?["read_iops"] as? Int == 0)
        #expect(try rig.get(qos).json?["write_bytes_per_second"] as? Int == 1_048_576)
        #expect(try rig.sim.xenstore("xenstore-read", ["\(backend)/qos-total-iops"]).stdout.hasPrefix("400"))
        #expect(try rig.sim.xenstore("xenstore-exists", ["\(backend)/qos-read-iops"]).status != 0, "a removed limit's key goes")

        // Bad values are refused whole; the limits in force stay.
        for body in [#"{"total_iops": -1}"#, #"{"read_iops": 1.5}"#, #"{"total_iops": 10000000000000}"#,
                     #"{"iops": 5}"#, #"[1]"#, #"{"burst_seconds": "5"}"#] {
            let refused = try rig.request("PUT", qos, body: Array(body.utf8))
            #expect(refused.status == 400 && refused.json?["error"] != nil, "\(body): \(refused.status) \(refused.body)")
        }
        #expect(try rig.get(qos).json?["total_iops"] as? Int == 400)
        #expect(try rig.request("PUT", "/v1/vbds/9/51712/qos", body: Array("{}".utf8)).status == 404)

        // No limits: the guest runs free again and still verifies.
        #expect(try rig.request("PUT", qos, body: Array("{}".utf8)).status == 200)
        let (status, report) = rig.stopGuest()
        #expect(status == 0 && report?["errors"] as? Int == 0 && report?["verify_failures"] as? Int == 0, "\(String(describing: report))")
        let metrics = try rig.get("/metrics").body
        #expect(metrics.contains("blkback_qos_delayed_requests_total{") && metrics.contains("blkback_qos_throttled_seconds_total{"))
    }

    @Test func onlineResizeReachesTheRunningGuestWithoutAReconnect() throws {
        let rig = try APIRig("resize")
        defer { rig.stop() }
        try rig.startGuest()
        #expect(try eventually { try rig.isConnected() }, "daemon: \(rig.daemon.output)")
        func sectors() throws -> Int? { try rig.get(APIRig.vbd).json?["sectors"] as? Int }
        #expect(try sectors() == (64 << 20) / 512)

        // The file grows: the daemon notices by itself and tells the guest.
        #expect(truncate(rig.disk, 128 << 20) == 0)
        #expect(try eventually { try sectors() == (128 << 20) / 512 }, "daemon: \(rig.daemon.output)")
        #expect(try rig.sim.xenstore("xenstore-read", ["/local/domain/0/backend/vbd/1/51712/sectors"]).stdout.hasPrefix("262144"))

        // It shrinks to a size that is no whole number of sectors: POST …/resize reads it now,
        // rounded down as Linux does.
        #expect(truncate(rig.disk, (96 << 20) + 300) == 0)
        let resized = try rig.post(APIRig.vbd + "/resize", "")
        #expect(resized.status == 202 && resized.json?["sectors"] as? Int == (96 << 20) / 512, "\(resized.body)")
        #expect(try rig.post(APIRig.vbd + "/resize", "[1]").status == 400)
        #expect(try rig.post("/v1/vbds/9/51712/resize", "").status == 404)

        let (status, report) = rig.stopGuest()
        #expect(status == 0 && report?["errors"] as? Int == 0 && report?["verify_failures"] as? Int == 0, "\(String(describing: report))")
        #expect(report?["reconnects"] as? Int == 0)
        #expect((report?["resizes"] as? Int ?? 0) >= 1, "\(String(describing: report))")
        #expect((report?["negotiated"] as? [String: Any])?["sectors"] as? Int == (96 << 20) / 512)
    }

    @Test func bearerTokenGuardsEverythingButHealth() throws {
        let tokenFile = try Harness.temporaryDirectory("api-token").appendingPathComponent("token")
        defer { try? FileManager.default.removeItem(at: tokenFile.deletingLastPathComponent()) }
        try "correct-horse-battery\n".write(to: tokenFile, atomically: true, encoding: .utf8)
        // Readable by others: refused, as ssh refuses such a key.
        let exposed = try Harness.run(Harness.executable("blkback-server"), ["--token-file", tokenFile.path, "--listen", "127.0.0.1:1"], timeout: 20)
        #expect(exposed.status == 2 && exposed.stderr.contains("chmod 600"), "\(exposed.stderr)")
        #expect(chmod(tokenFile.path, 0o600) == 0)
        let rig = try APIRig("api-token", daemonArguments: ["--token-file", tokenFile.path], attach: false)
        defer { rig.stop() }

        #expect(try rig.get("/healthz").status == 200)
        for path in ["/v1/vbds", "/metrics", "/v1/vbds/1/51712", "/nowhere"] {
            let missing = try rig.get(path)
            #expect(missing.status == 401 && missing.error != nil && missing.headers["www-authenticate"]?.hasPrefix("Bearer") == true, "\(path)")
            #expect(try rig.get(path, headers: ["Authorization: Bearer correct-horse-batter"]).status == 401)
            #expect(try rig.get(path, headers: ["Authorization: Basic correct-horse-battery"]).status == 401)
        }
        #expect(try rig.post(APIRig.vbd + "/state", #"{"state":"closing"}"#).status == 401)
        let authorized = try rig.get("/v1/vbds", headers: ["Authorization: Bearer correct-horse-battery"])
        #expect(authorized.status == 200 && authorized.body == "{\"vbds\":[]}\n")
        #expect(try rig.get("/metrics", headers: ["Authorization: Bearer correct-horse-battery"]).status == 200)
    }

    /// A guest at its grant cap keeps being served: the pages past it are copied by the
    /// hypervisor instead of mapped, the guest's verified I/O never fails, and the stats and
    /// metrics count them.
    @Test func aGuestAtItsGrantCapIsServedByGrantCopy() throws {
        let rig = try APIRig("api-grant-cap", daemonArguments: ["--max-grants-per-domain", "64"])
        defer { rig.stop() }
        // Without persistent grants every request's pages are mapped for it: 32 requests of
        // 8 pages want 256 at once.
        try rig.startGuest(seconds: 120, ["--no-persistent", "--bs", "32k", "--qd", "32"])
        #expect(eventually(timeout: 60) { (try? rig.stats()["grant_cap_copied"] ?? 0) ?? 0 > 1000 },
                "\(String(describing: try? rig.stats())) \(rig.daemon.output.suffix(2000))")
        let metrics = try rig.get("/metrics").body
        #expect(metrics.contains("blkback_grant_cap_copied_pages_total{"), "\(metrics.prefix(400))")
        let (status, report) = rig.stopGuest()
        #expect(status == 0 && report?["errors"] as? Int == 0 && report?["verify_failures"] as? Int == 0,
                "\(String(describing: report))")
        #expect((report?["ops"] as? Int ?? 0) > 100)
    }

    /// Slowloris from two hosts: 64 connections that send their headers a byte at a time
    /// take no slot /healthz and /metrics need, and a host gets no more than its 32.
    @Test func tricklingClientsLeaveHealthAndMetricsAnswering() throws {
        let rig = try APIRig("api-trickle", attach: false)
        defer { rig.stop() }
        var tricklers: [Int32] = []
        defer { for fd in tricklers { close(fd) } }
        for index in 0..<64 {
            let fd = try LoopbackSocket.connect(port: rig.port, source: index < 32 ? "127.0.0.2" : "127.0.0.3")
            tricklers.append(fd)
            try LoopbackSocket.send(fd, "GET /healthz HTTP/1.1\r\nX")
        }
        for _ in 0..<3 {
            for fd in tricklers { try LoopbackSocket.send(fd, "x") }
            #expect(try rig.get("/healthz").status == 200)
            #expect(try rig.get("/metrics").status == 200)
            usleep(200_000)
        }
        // A 33rd connection from a host that has 32 is closed unanswered.
        let extra = try LoopbackSocket.connect(port: rig.port, source: "127.0.0.2", timeout: 10)
        defer { close(extra) }
        try? LoopbackSocket.send(extra, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        #expect(LoopbackSocket.readResponse(extra).status == nil)
        // The tricklers finish their requests and are answered.
        for fd in tricklers { try LoopbackSocket.send(fd, "-Slow: 1\r\nConnection: close\r\n\r\n") }
        #expect(tricklers.allSatisfy { LoopbackSocket.readResponse($0).status == 200 })
    }

    @Test func nonLoopbackWithoutTokenIsRefused() throws {
        let sim = try Simulator("api-listen")
        defer { sim.stop() }
        for address in ["0.0.0.0:18999", "[::]:18999"] {
            let result = try Harness.run(Harness.executable("blkback-server"), ["--sim", sim.path, "--listen", address], timeout: 20)
            #expect(result.status == 2, "\(address): \(result.stderr)")
            #expect(result.stderr.contains("without --token-file") && result.stderr.split(separator: "\n").count == 1)
        }
        let bad = try Harness.run(Harness.executable("blkback-server"), ["--sim", sim.path, "--tls-cert", "/nonexistent"], timeout: 20)
        #expect(bad.status == 2 && bad.stderr.split(separator: "\n").count == 1, "\(bad.stderr)")
        // With a token but without TLS: refused unless the operator accepts plain HTTP.
        let token = sim.directory.appendingPathComponent("token").path
        #expect(FileManager.default.createFile(atPath: token, contents: Data("secret\n".utf8), attributes: [.posixPermissions: 0o600]))
        let plain = try Harness.run(Harness.executable("blkback-server"), ["--sim", sim.path, "--listen", "0.0.0.0:18999", "--token-file", token], timeout: 20)
        #expect(plain.status == 2 && plain.stderr.contains("--insecure-http"), "\(plain.stderr)")
        // --insecure-http passes that check; 192.0.2.1 (TEST-NET-1) is on no interface here,
        // so the listen itself fails and nothing is exposed.
        let accepted = try Harness.run(Harness.executable("blkback-server"),
                                       ["--sim", sim.path, "--listen", "192.0.2.1:18999", "--token-file", token, "--insecure-http"], timeout: 20)
        #expect(accepted.status == 1 && accepted.stderr.contains("cannot listen on 192.0.2.1:18999"), "\(accepted.stderr)")
    }

    @Test(.enabled(if: (try? Harness.which("openssl")) != nil, "openssl is needed to make a certificate"))
    func httpsWithACertificate() throws {
        let directory = try Harness.temporaryDirectory("api-tls")
        defer { try? FileManager.default.removeItem(at: directory) }
        let cert = directory.appendingPathComponent("cert.pem").path, key = directory.appendingPathComponent("key.pem").path
        let made = try Harness.run("openssl", ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                                               "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"])
        #expect(made.status == 0, "\(made.stderr)")
        let rig = try APIRig("api-tls", daemonArguments: ["--tls-cert", cert, "--tls-key", key], scheme: "https", attach: false)
        defer { rig.stop() }
        #expect(rig.daemon.output.contains("HTTP API listening on https://"))
        let health = try rig.request("GET", "/healthz", curlArguments: ["--cacert", cert])
        #expect(health.status == 200 && health.body == "{\"status\":\"ok\"}\n")
        // A client offering only TLS 1.1 (its own floor lowered) is refused by the listener's
        // GnuTLS priorities; TLS 1.2 is accepted.
        func handshake(_ version: String) throws -> Harness.Result {
            try Harness.run("openssl", ["s_client", "-connect", "127.0.0.1:\(rig.port)", "-\(version)", "-cipher", "DEFAULT:@SECLEVEL=0"],
                            timeout: 20)
        }
        let old = try handshake("tls1_1")
        #expect(old.status != 0 && old.stdout.contains("Cipher is (NONE)"), "TLS 1.1 was accepted: \(old.stdout.suffix(400))")
        let tls12 = try handshake("tls1_2")
        #expect(tls12.status == 0 && tls12.stdout.contains("Protocol  : TLSv1.2"), "\(tls12.stdout.suffix(400))")
        // Plain HTTP to the TLS port gets no answer.
        let plain = try Harness.run("curl", ["-sS", "--max-time", "5", "http://127.0.0.1:\(rig.port)/healthz"], timeout: 20)
        #expect(plain.status != 0 || !plain.stdout.contains("\"status\""))
    }
}
