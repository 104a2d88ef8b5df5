import Foundation
import Testing

/// The one-host Ceph cluster `make ceph-test` starts (scripts/ceph-cluster.sh): its
/// directory, with ceph.conf and the daemons' pid files.
enum CephCluster {
    static let directory = ProcessInfo.processInfo.environment["BLKBACK_CEPH_DIR"]
    static var configuration: String { directory! + "/ceph.conf" }
    static let pool = "blkback"

    /// `rbd` against the cluster.
    @discardableResult
    static func rbd(_ arguments: [String]) throws -> Harness.Result {
        let result = try Harness.run("rbd", ["--conf", configuration] + arguments, timeout: 120)
        #expect(result.status == 0, "rbd \(arguments.joined(separator: " ")): \(result.stderr)")
        return result
    }

    /// A new image of `megabytes` MiB with the default features (exclusive-lock among them).
    static func createImage(_ label: String, megabytes: Int = 64) throws -> String {
        let name = "\(label)-\(UUID().uuidString.prefix(8))"
        try rbd(["create", "--size", "\(megabytes)M", "\(pool)/\(name)"])
        return name
    }

    static func removeImage(_ name: String) {
        _ = try? Harness.run("rbd", ["--conf", configuration, "snap", "purge", "\(pool)/\(name)"], timeout: 120)
        _ = try? Harness.run("rbd", ["--conf", configuration, "rm", "--no-progress", "\(pool)/\(name)"], timeout: 120)
    }

    /// The target a toolstack writes in params.
    static func target(_ image: String) -> String { "rbd:\(pool)/\(image):conf=\(configuration)" }

    /// The OSD's pid, to freeze it (SIGSTOP) as a partitioned cluster would go silent.
    static func osdPID() throws -> pid_t {
        let text = try String(contentsOfFile: directory! + "/run/osd.0.pid", encoding: .utf8)
        guard let pid = pid_t(text.trimmingCharacters(in: .whitespacesAndNewlines)) else { throw HarnessError("no pid in run/osd.0.pid") }
        return pid
    }
}

/// blkback-server serving Ceph RBD images through librbd, on the cluster `make ceph-test`
/// starts; skipped without one.
@Suite(.enabled(if: CephCluster.directory != nil, "needs the cluster of make ceph-test (BLKBACK_CEPH_DIR)"),
       .timeLimit(.minutes(5)), .serialized)
struct RBDTests {
    private func attach(_ rig: APIRig, _ target: String, mode: String = "w") throws -> Harness.Result {
        try rig.sim.xensim(["attach"], ["--domid", "1", "--devid", "51712", "--target", target, "--mode", mode])
    }

    /// A host with domain 1 and `image` attached writable.
    private func hostWithImage(_ label: String, _ image: String) throws -> APIRig {
        let rig = try APIRig(label, attach: false)
        #expect(try rig.sim.xensim(["domain", "create"], ["--domid", "1"]).status == 0)
        let attached = try attach(rig, CephCluster.target(image))
        #expect(attached.status == 0, "attach: \(attached.stderr) daemon: \(rig.daemon.output.suffix(2000))")
        return rig
    }

    private func errorNode(_ rig: APIRig) throws -> String {
        try rig.sim.xenstore("xenstore-read", ["/local/domain/0/error/backend/vbd/1/51712/error"]).stdout
    }

    @Test func aGuestVerifiesEverySectorItWroteThroughRBD() throws {
        let image = try CephCluster.createImage("verify")
        defer { CephCluster.removeImage(image) }
        let rig = try hostWithImage("rbd-verify", image)
        defer { rig.stop() }
        let vbd = try rig.get(APIRig.vbd).json
        #expect(vbd?["target"] as? String == "rbd:\(CephCluster.pool)/\(image)", "named without its options")
        #expect(vbd?["sectors"] as? Int == (64 << 20) / 512, "the size comes from the image")

        // Two queues on one image, indirect requests of up to 128 KiB, writes stamped and read back.
        let guest = try BackgroundProcess(Harness.executable("xensim"), [
            "frontend", "--dir", rig.sim.path, "--domid", "1", "--devid", "51712", "--workload", "verify",
            "--bs", "128k", "--qd", "16", "--queues", "2", "--seconds", "5", "--max-indirect-segments", "32", "--json",
        ])
        #expect(try eventually { try rig.isConnected() })
        let connected = try rig.get(APIRig.vbd).json
        #expect(connected?["io_mode"] as? String == "copy")
        let features = connected?["features"] as? [String: Bool]
        #expect(features?["flush"] == true && features?["discard"] == true, "\(String(describing: features))")
        #expect(guest.wait(timeout: 120) == 0, "guest: \(guest.output.suffix(2000))")
        let report = DaemonRig.report(guest.output)
        #expect(report["errors"] as? Int == 0 && report["verify_failures"] as? Int == 0, "\(report)")
        #expect((report["ops"] as? Int ?? 0) > 0 && (report["negotiated"] as? [String: Any])?["queues"] as? Int == 2, "\(report)")

        // Discards go to librbd and are answered OK; a second pass still verifies.
        let (status, discarded) = try rig.runFrontend(["--workload", "discard", "--bs", "1M", "--bytes", "\(8 << 20)"])
        #expect(status == 0 && discarded["errors"] as? Int == 0 && discarded["discards"] as? Int == 8, "\(discarded)")
        let (again, verified) = try rig.runFrontend(["--workload", "verify", "--seconds", "2"])
        #expect(again == 0 && verified["errors"] as? Int == 0 && verified["verify_failures"] as? Int == 0, "\(verified)")
    }

    /// Two hosts (two simulators, two daemons) and one image: host B cannot attach it
    /// writable while host A holds it; the guest writes every sector on A, the disk is
    /// detached there and attached on B, where every sector reads back with A's stamp.
    @Test func aGuestMovesBetweenHostsAndOnlyOneHostWrites() throws {
        let image = try CephCluster.createImage("move")
        defer { CephCluster.removeImage(image) }
        let hostA = try APIRig("rbd-host-a", attach: false), hostB = try APIRig("rbd-host-b", attach: false)
        defer { hostA.stop(); hostB.stop() }
        for host in [hostA, hostB] { #expect(try host.sim.xensim(["domain", "create"], ["--domid", "1"]).status == 0) }
        let target = CephCluster.target(image)

        #expect(try attach(hostA, target).status == 0)
        let refused = try attach(hostB, target)
        #expect(refused.status != 0 && refused.stderr.contains("the backend gave up"), "host B: \(refused.stderr)")
        let error = try errorNode(hostB)
        #expect(error.contains("exclusive lock") && error.contains("detach it there first"), "host B's error node: \(error)")
        #expect(try hostB.get("/healthz").status == 200)
        #expect(try hostB.sim.xensim(["detach"], ["--domid", "1", "--devid", "51712"]).status == 0)

        let (wrote, written) = try hostA.runFrontend(["--workload", "write", "--bs", "1M", "--qd", "8", "--max-indirect-segments", "256"])
        #expect(wrote == 0 && written["bytes"] as? Int == 64 << 20, "host A: \(written)")
        let detached = try hostA.sim.xensim(["detach"], ["--domid", "1", "--devid", "51712"])
        #expect(detached.status == 0, "detach on host A: \(detached.stderr)")

        let attached = try attach(hostB, target)
        #expect(attached.status == 0, "host B once A let go: \(attached.stderr) \(hostB.daemon.output.suffix(2000))")
        let (read, report) = try hostB.runFrontend(["--workload", "read", "--bs", "1M", "--qd", "8", "--max-indirect-segments", "256",
                                                  "--verify-existing"])
        #expect(read == 0 && report["bytes"] as? Int == 64 << 20, "host B: \(report)")
        #expect(report["verify_failures"] as? Int == 0 && report["errors"] as? Int == 0, "host B: \(report)")
    }

    /// A snapshot is served read-only: a writable attach is refused with a clear error, a
    /// read-only one reads what the image held when the snapshot was taken.
    @Test func aSnapshotIsServedReadOnly() throws {
        let image = try CephCluster.createImage("snap")
        defer { CephCluster.removeImage(image) }
        let rig = try hostWithImage("rbd-snap", image)
        defer { rig.stop() }
        let (wrote, written) = try rig.runFrontend(["--workload", "write", "--bs", "1M", "--qd", "8", "--max-indirect-segments", "256"])
        #expect(wrote == 0 && written["errors"] as? Int == 0, "\(written)")
        #expect(try rig.sim.xensim(["detach"], ["--domid", "1", "--devid", "51712"]).status == 0)
        try CephCluster.rbd(["snap", "create", "\(CephCluster.pool)/\(image)@before"])
        let snapshot = "rbd:\(CephCluster.pool)/\(image)@before:conf=\(CephCluster.configuration)"

        let refused = try attach(rig, snapshot, mode: "w")
        #expect(refused.status != 0, "a writable snapshot: \(refused.stderr)")
        #expect(try errorNode(rig).contains("read-only; attach it with mode r"))
        #expect(try rig.sim.xensim(["detach"], ["--domid", "1", "--devid", "51712"]).status == 0)

        #expect(try attach(rig, snapshot, mode: "r").status == 0)
        let (read, report) = try rig.runFrontend(["--workload", "read", "--bs", "1M", "--qd", "8", "--max-indirect-segments", "256",
                                                "--verify-existing"])
        #expect(read == 0 && report["verify_failures"] as? Int == 0 && report["bytes"] as? Int == 64 << 20, "\(report)")
    }

    /// A restart (SIGTERM, planned) or a crash (SIGKILL) of the daemon mid-workload: the next
    /// daemon takes the rings over and the image with them; the guest, which never
    /// reconnects, sees a pause and no error. After a crash the image's lock is held by a
    /// client that is gone, which the state directory recorded: the next daemon breaks that
    /// lock (Ceph would only once the client's watch times out, about 30 s).
    @Test(arguments: [SIGTERM, SIGKILL])
    func theNextDaemonTakesTheImageOver(signal: Int32) throws {
        let image = try CephCluster.createImage("takeover")
        defer { CephCluster.removeImage(image) }
        let rig = try DaemonRig("rbd-takeover")
        defer { rig.stop() }
        try rig.attach(domid: 1, disk: CephCluster.target(image))
        // Linux blkfront waits for answers as long as it takes; the simulated one gives up
        // after --response-timeout, generous here for a loaded machine.
        let guest = try rig.guest(["--workload", "randrw", "--size", "4M", "--qd", "32", "--flush-every", "64",
                                   "--seconds", "10", "--no-reconnect", "--response-timeout", "120"])
        #expect(try rig.waitForBackend("4"), "never Connected: \(rig.daemon.output) \(guest.output)")
        #expect(try eventually { try rig.read(DaemonRig.frontend + "/state") == "4" })
        usleep(1_000_000)   // mid-workload

        _ = rig.signalDaemon(signal)
        rig.daemon = try DaemonRig.startDaemon(rig.sim)
        #expect(guest.wait(timeout: 200) == 0, "guest: \(guest.output.suffix(1500)) daemon: \(rig.daemon.output.suffix(3000))")
        #expect(rig.daemon.output.contains("took over the connected device"), "\(rig.daemon.output.suffix(3000))")
        // A killed daemon still holds the lock: its successor breaks it rather than wait
        // out Ceph's watch timeout. One that stopped cleanly closed the image.
        #expect(rig.daemon.output.contains("broke the exclusive lock") == (signal == SIGKILL), "\(rig.daemon.output.suffix(3000))")
        let report = DaemonRig.report(guest.output)
        #expect(report["errors"] as? Int == 0 && report["verify_failures"] as? Int == 0 && report["reconnects"] as? Int == 0, "\(report)")
    }

    /// The cluster goes silent mid-I/O (its only OSD frozen, as a partition would leave it):
    /// requests wait, the metrics name the waiting VBD, and once the OSD answers again
    /// every request completes and nothing acknowledged is lost.
    @Test func aSilentClusterIsWaitedForAndNothingIsLost() throws {
        let image = try CephCluster.createImage("silent")
        defer { CephCluster.removeImage(image) }
        let rig = try hostWithImage("rbd-silent", image)
        defer { rig.stop() }
        let guest = try BackgroundProcess(Harness.executable("xensim"), [
            "frontend", "--dir", rig.sim.path, "--domid", "1", "--devid", "51712", "--workload", "verify",
            "--qd", "16", "--seconds", "300", "--json",
        ])
        #expect(try eventually { (try rig.stats()["wr_req"] ?? 0) > 200 })

        let osd = try CephCluster.osdPID()
        #expect(kill(osd, SIGSTOP) == 0)
        var resumed = false
        defer { if !resumed { kill(osd, SIGCONT) } }
        #expect(try eventually(timeout: 60) { (try rig.stats()["store_waiting_rings"] ?? 0) > 0 },
                "daemon: \(rig.daemon.output.suffix(2000))")
        let metrics = try rig.get("/metrics").body
        #expect(metrics.split(separator: "\n").contains { $0.hasPrefix("blkback_store_waiting_rings{") && $0.contains("devid=\"51712\"") && $0.hasSuffix(" 1") },
                "metrics name the waiting VBD")
        #expect(try rig.get("/healthz").status == 200)

        #expect(kill(osd, SIGCONT) == 0)
        resumed = true
        #expect(try eventually(timeout: 60) { try rig.stats()["store_waiting_rings"] == 0 })
        let after = try rig.stats()["wr_req"] ?? 0
        #expect(try eventually { (try rig.stats()["wr_req"] ?? 0) > after + 100 })
        #expect(guest.stop(signal: SIGINT, grace: 60) == 0, "guest: \(guest.output.suffix(1500))")
        let report = DaemonRig.report(guest.output)
        #expect(report["errors"] as? Int == 0 && report["verify_failures"] as? Int == 0, "\(report)")
        let (status, again) = try rig.runFrontend(["--workload", "verify", "--seconds", "2"])
        #expect(status == 0 && again["verify_failures"] as? Int == 0, "\(again)")
    }
}

/// No cluster answers: the device fails the way a missing file does (the toolstack sees the
/// error node, the guest gets no disk), and the daemon serves on. Needs no cluster.
@Suite struct RBDUnreachableTests {
    @Test func anUnreachableClusterFailsTheAttachWithAnErrorNode() throws {
        let rig = try APIRig("rbd-unreachable", daemonArguments: ["--store-connect-timeout", "2"], attach: false)
        defer { rig.stop() }
        #expect(try rig.sim.xensim(["domain", "create"], ["--domid", "1"]).status == 0)
        let failed = try rig.sim.xensim(["attach"], ["--domid", "1", "--devid", "51712", "--target", #"rbd:blkback/disk:mon_host=127.0.0.1\:9"#])
        #expect(failed.status != 0 && failed.stderr.contains("the backend gave up"), "stderr: \(failed.stderr)")
        let error = try rig.sim.xenstore("xenstore-read", ["/local/domain/0/error/backend/vbd/1/51712/error"])
        #expect(error.stdout.contains("connecting to the Ceph cluster of rbd:blkback/disk"), "error node: \(error.stdout) \(error.stderr)")
        #expect(try rig.get("/healthz").status == 200)
        #expect(rig.daemon.isRunning)
    }
}
