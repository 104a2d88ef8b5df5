import Foundation
import Testing

/// nbdkit (Debian's) serving one export on a unix socket in the test's directory.
final class NBDServer {
    enum Plugin: String, CaseIterable, CustomTestStringConvertible, Sendable {
        /// A sparse RAM disk of 64 MiB (trims; multi-conn).
        case memory
        /// A 64 MiB file: its data outlives the server, so a restarted server serves it again.
        case file
        var testDescription: String { rawValue }
    }

    let plugin: Plugin
    let socket: String
    let image: String
    /// With TLS required: the pre-shared key file (GnuTLS's "username:hexkey" lines).
    let pskFile: String?
    static let pskUser = "blkback"
    private var process: BackgroundProcess?

    var uri: String { "nbd+unix:///?socket=\(socket)" }
    /// The TLS form: the user the key file names, and the file.
    var tlsURI: String { "nbds+unix://\(Self.pskUser)@/?socket=\(socket)&tls-psk-file=\(pskFile ?? "")" }

    init(_ plugin: Plugin, in directory: URL, requireTLS: Bool = false) throws {
        self.plugin = plugin
        socket = directory.appendingPathComponent("nbd.sock").path
        image = directory.appendingPathComponent("export.img").path
        if requireTLS {
            let file = directory.appendingPathComponent("nbd.psk").path
            var generator = SystemRandomNumberGenerator()
            let key = (0..<32).map { _ in UInt8.random(in: 0...255, using: &generator) }
            let line = Self.pskUser + ":" + key.map { String(format: "%02x", $0) }.joined() + "\n"
            #expect(FileManager.default.createFile(atPath: file, contents: Data(line.utf8), attributes: [.posixPermissions: 0o600]))
            pskFile = file
        } else {
            pskFile = nil
        }
        if plugin == .file {
            #expect(FileManager.default.createFile(atPath: image, contents: nil))
            #expect(truncate(image, 64 << 20) == 0)
        }
        try start()
    }

    /// Starts (again) on the same socket; returns once the socket is there.
    func start() throws {
        unlink(socket)
        let arguments = plugin == .memory ? ["memory", "size=64M"] : ["file", "file=\(image)"]
        let tls = pskFile.map { ["--tls=require", "--tls-psk=\($0)"] } ?? []
        let server = try BackgroundProcess(try Harness.which("nbdkit"),
                                           ["--foreground", "--exit-with-parent", "--unix", socket] + tls + arguments)
        process = server
        guard eventually(timeout: 30, { access(socket, F_OK) == 0 || !server.isRunning }), server.isRunning else {
            throw HarnessError("nbdkit did not start: \(server.output)")
        }
    }

    /// Kills the server at once (a crash: no goodbye to its clients).
    func crash() {
        _ = process?.stop(signal: SIGKILL, grace: 5)
        process = nil
    }

    deinit { crash() }
}

/// blkback-server serving NBD exports: verified guest I/O through nbdkit, an unreachable
/// server at connect, a server lost and back mid-I/O, and one gone for good.
@Suite(.timeLimit(.minutes(5))) struct NBDTests {
    /// The neighbour: a local file in another guest (one guest is one frontend process).
    static let other = "/v1/vbds/2/51712"

    private func attach(_ rig: APIRig, domid: Int = 1, _ target: String) throws -> Harness.Result {
        try rig.sim.xensim(["attach"], ["--domid", "\(domid)", "--devid", "51712", "--target", target])
    }

    @Test(arguments: NBDServer.Plugin.allCases)
    func aGuestVerifiesEverySectorItWroteThroughNBDKit(plugin: NBDServer.Plugin) throws {
        let rig = try APIRig("nbd-\(plugin)", attach: false)
        defer { rig.stop() }
        let server = try NBDServer(plugin, in: rig.sim.directory)
        #expect(try rig.sim.xensim(["domain", "create"], ["--domid", "1"]).status == 0)
        let attached = try attach(rig, server.uri)
        #expect(attached.status == 0, "attach: \(attached.stderr) daemon: \(rig.daemon.output)")
        let vbd = try rig.get(APIRig.vbd).json
        #expect(vbd?["target"] as? String == server.uri)
        #expect(vbd?["sectors"] as? Int == (64 << 20) / 512, "the size comes from the server")

        // Two queues, indirect requests of up to 128 KiB, writes stamped and read back.
        let guest = try BackgroundProcess(Harness.executable("xensim"), [
            "frontend", "--dir", rig.sim.path, "--domid", "1", "--devid", "51712", "--workload", "verify",
            "--bs", "128k", "--qd", "16", "--queues", "2", "--seconds", "4", "--max-indirect-segments", "32", "--json",
        ])
        #expect(try eventually { try rig.isConnected() })
        let connected = try rig.get(APIRig.vbd).json
        #expect(connected?["io_mode"] as? String == "copy")
        let features = connected?["features"] as? [String: Bool]
        #expect(features?["flush"] == true && features?["discard"] == true, "nbdkit's \(plugin) plugin trims: \(String(describing: features))")
        #expect(guest.wait(timeout: 90) == 0, "guest: \(guest.output)")
        let report = DaemonRig.report(guest.output)
        #expect(report["errors"] as? Int == 0 && report["verify_failures"] as? Int == 0, "\(report)")
        #expect((report["ops"] as? Int ?? 0) > 0)
        #expect((report["negotiated"] as? [String: Any])?["queues"] as? Int == 2)

        // Discards reach the server as trims and are answered OK.
        let (status, discarded) = try rig.runFrontend(["--workload", "discard", "--bs", "1M", "--bytes", "\(8 << 20)"])
        #expect(status == 0 && discarded["errors"] as? Int == 0 && discarded["discards"] as? Int == 8, "\(discarded)")
    }

    /// A server that requires TLS (a pre-shared key): the nbds+unix URI with the key file
    /// carries verified I/O; the plain URI is refused at attach with an error node.
    @Test func aServerRequiringTLSIsReachedThroughTheNBDSURI() throws {
        let rig = try APIRig("nbd-tls", attach: false)
        defer { rig.stop() }
        let server = try NBDServer(.memory, in: rig.sim.directory, requireTLS: true)
        #expect(try rig.sim.xensim(["domain", "create"], ["--domid", "1"]).status == 0)
        let plain = try attach(rig, server.uri)
        #expect(plain.status != 0, "a plain connection to a TLS-only server: \(plain.stderr)")
        let error = try rig.sim.xenstore("xenstore-read", ["/local/domain/0/error/backend/vbd/1/51712/error"]).stdout
        #expect(error.contains("NBD export unreachable"), "error node: \(error)")
        #expect(try rig.sim.xensim(["detach"], ["--domid", "1", "--devid", "51712"]).status == 0)

        let attached = try attach(rig, server.tlsURI)
        #expect(attached.status == 0, "attach over TLS: \(attached.stderr) daemon: \(rig.daemon.output.suffix(2000))")
        let (status, report) = try rig.runFrontend(["--workload", "verify", "--qd", "16", "--queues", "2", "--seconds", "3"])
        #expect(status == 0 && report["errors"] as? Int == 0 && report["verify_failures"] as? Int == 0, "\(report)")
        #expect((report["ops"] as? Int ?? 0) > 0, "\(report)")
    }

    /// The server is not there when the device is opened: the toolstack sees the error node,
    /// the guest gets no disk, as with a missing file; the daemon serves on.
    @Test func anUnreachableServerFailsTheAttachWithAnErrorNode() throws {
        let rig = try APIRig("nbd-unreachable", attach: false)
        defer { rig.stop() }
        #expect(try rig.sim.xensim(["domain", "create"], ["--domid", "1"]).status == 0)
        let nowhere = "nbd+unix:///?socket=\(rig.sim.directory.appendingPathComponent("nobody.sock").path)"
        let failed = try attach(rig, nowhere)
        #expect(failed.status != 0 && failed.stderr.contains("the backend gave up"), "stderr: \(failed.stderr)")
        let error = try rig.sim.xenstore("xenstore-read", ["/local/domain/0/error/backend/vbd/1/51712/error"])
        #expect(error.stdout.contains("NBD export unreachable"), "error node: \(error.stdout) \(error.stderr)")
        #expect(try rig.get("/healthz").status == 200)
        #expect(rig.daemon.isRunning)
    }

    /// nbdkit crashes mid-I/O and comes back: the requests wait and are sent again, no
    /// acknowledged write is lost (every sector the guest reads back verifies), the metrics
    /// name the waiting VBD, and the VBD on a local file beside it is served throughout.
    @Test func aServerLostMidIOIsWaitedForAndNothingIsLost() throws {
        let rig = try APIRig("nbd-lost", attach: false)
        defer { rig.stop() }
        let server = try NBDServer(.file, in: rig.sim.directory)
        for domid in [1, 2] { #expect(try rig.sim.xensim(["domain", "create"], ["--domid", "\(domid)"]).status == 0) }
        #expect(try attach(rig, server.uri).status == 0)
        let local = rig.sim.directory.appendingPathComponent("local.img").path
        #expect(FileManager.default.createFile(atPath: local, contents: nil) && truncate(local, 64 << 20) == 0)
        #expect(try attach(rig, domid: 2, local).status == 0)

        func guest(_ domid: Int) throws -> BackgroundProcess {
            try BackgroundProcess(Harness.executable("xensim"), [
                "frontend", "--dir", rig.sim.path, "--domid", "\(domid)", "--devid", "51712", "--workload", "verify",
                "--qd", "16", "--seconds", "300", "--json",
            ])
        }
        let overNBD = try guest(1), beside = try guest(2)
        #expect(try eventually { (try rig.stats()["wr_req"] ?? 0) > 200 })

        server.crash()
        #expect(try eventually { (try rig.stats()["store_waiting_rings"] ?? 0) > 0 }, "daemon: \(rig.daemon.output.suffix(2000))")
        let metrics = try rig.get("/metrics").body
        #expect(metrics.split(separator: "\n").contains { $0.hasPrefix("blkback_store_waiting_rings{") && $0.contains("devid=\"51712\"") && $0.hasSuffix(" 1") },
                "metrics name the waiting VBD")
        // The neighbour's requests keep being answered while the NBD VBD waits.
        func neighbourRequests() throws -> Int {
            let stats = try rig.get(Self.other + "/stats").json ?? [:]
            return (stats["rd_req"] as? Int ?? 0) + (stats["wr_req"] as? Int ?? 0)
        }
        let before = try neighbourRequests()
        #expect(try eventually { try neighbourRequests() > before + 100 })

        try server.start()
        #expect(try eventually {
            let stats = try rig.stats()
            return stats["store_waiting_rings"] == 0 && stats["store_reconnects"] ?? 0 >= 1
        },
                "daemon: \(rig.daemon.output.suffix(2000))")
        // Requests flow again.
        let resumed = try rig.stats()["wr_req"] ?? 0
        #expect(try eventually { (try rig.stats()["wr_req"] ?? 0) > resumed + 100 })
        for (name, process) in [("over NBD", overNBD), ("beside", beside)] {
            // Ended as an operator would (SIGINT): its report comes out, exit 0 without errors.
            #expect(process.stop(signal: SIGINT, grace: 30) == 0, "\(name): \(process.output.suffix(1500))")
            let report = DaemonRig.report(process.output)
            #expect(report["errors"] as? Int == 0 && report["verify_failures"] as? Int == 0, "\(name): \(report)")
        }
        // Everything the guest wrote is in the export: a fresh pass reads it back verified.
        let (status, again) = try rig.runFrontend(["--workload", "verify", "--seconds", "2"])
        #expect(status == 0 && again["verify_failures"] as? Int == 0, "\(again)")
    }

    /// Two hosts (two simulators, two daemons) and one export: the guest writes every sector
    /// on host A, its disk is detached there and attached on host B, where every sector
    /// reads back with host A's stamp.
    @Test func aGuestMovesBetweenHostsOnOneExport() throws {
        let hostA = try APIRig("nbd-host-a", attach: false), hostB = try APIRig("nbd-host-b", attach: false)
        defer { hostA.stop(); hostB.stop() }
        let server = try NBDServer(.file, in: hostA.sim.directory)
        for host in [hostA, hostB] { #expect(try host.sim.xensim(["domain", "create"], ["--domid", "1"]).status == 0) }

        #expect(try attach(hostA, server.uri).status == 0)
        let (wrote, written) = try hostA.runFrontend(["--workload", "write", "--bs", "1M", "--qd", "8", "--max-indirect-segments", "256"])
        #expect(wrote == 0 && written["bytes"] as? Int == 64 << 20, "host A: \(written)")
        let detached = try hostA.sim.xensim(["detach"], ["--domid", "1", "--devid", "51712"])
        #expect(detached.status == 0, "detach on host A: \(detached.stderr)")

        #expect(try attach(hostB, server.uri).status == 0)
        let (read, report) = try hostB.runFrontend(["--workload", "read", "--bs", "1M", "--qd", "8", "--max-indirect-segments", "256",
                                                  "--verify-existing"])
        #expect(read == 0 && report["bytes"] as? Int == 64 << 20, "host B: \(report)")
        #expect(report["verify_failures"] as? Int == 0 && report["errors"] as? Int == 0, "host B: \(report)")
    }

    /// A server gone for longer than --store-retry-timeout: the waiting requests fail with
    /// an error response, the daemon serves on, and the VBD works again once the server is back.
    @Test func aServerGoneForGoodFailsRequestsAfterTheRetryTimeout() throws {
        let rig = try APIRig("nbd-gone", daemonArguments: ["--store-retry-timeout", "1"], attach: false)
        defer { rig.stop() }
        let server = try NBDServer(.file, in: rig.sim.directory)
        #expect(try rig.sim.xensim(["domain", "create"], ["--domid", "1"]).status == 0)
        #expect(try attach(rig, server.uri).status == 0)
        let guest = try BackgroundProcess(Harness.executable("xensim"), [
            "frontend", "--dir", rig.sim.path, "--domid", "1", "--devid", "51712", "--workload", "randrw",
            "--seconds", "6", "--json",
        ])
        #expect(try eventually { (try rig.stats()["rd_req"] ?? 0) > 100 })
        server.crash()
        #expect(try eventually { (try rig.stats()["errors"] ?? 0) > 0 }, "daemon: \(rig.daemon.output.suffix(2000))")
        #expect(guest.wait(timeout: 90) != 0, "the guest saw its I/O errors")
        #expect(try rig.get("/healthz").status == 200)

        try server.start()
        #expect(try eventually { try rig.stats()["store_waiting_rings"] == 0 })
        let (status, report) = try rig.runFrontend(["--workload", "randrw", "--seconds", "2"])
        #expect(status == 0 && report["errors"] as? Int == 0, "\(report)")
    }
}
