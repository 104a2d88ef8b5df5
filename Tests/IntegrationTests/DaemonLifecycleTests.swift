import Foundation
import Testing

/// The daemon's life as an operator sees it: SIGTERM/SIGINT drain (stop taking requests,
/// finish in-flight I/O, answer the frontend, exit 0 within 10 s), a restart the guests
/// reconnect across, and the demo the README starts.
@Suite(.serialized) struct DaemonLifecycleTests {
    typealias Rig = DaemonRig
    static let backend = DaemonRig.backend

    static func report(_ process: BackgroundProcess) -> [String: Any] { DaemonRig.report(process.output) }

    @Test func sigtermMidWorkloadDrainsAndTheGuestReconnectsToTheNextDaemon() throws {
        let rig = try Rig("drain", attach: true)
        defer { rig.stop() }
        // A small region: after the restart nearly every block is read again, so a write the
        // guest saw acknowledged and the drain lost would be a verification failure.
        let guest = try rig.guest(["--workload", "randrw", "--size", "4M", "--qd", "32", "--flush-every", "64",
                                   "--seconds", "10"])
        #expect(try rig.waitForBackend("4"), "never Connected: \(rig.daemon.output) \(guest.output)")
        // Mid-workload: a good part of the region already holds the guest's writes.
        #expect(try rig.waitForStamps(rig.disk, inFirst: 4 << 20, atLeast: 1024), "guest: \(guest.output)")

        let status = rig.signalDaemon(SIGTERM)
        #expect(status == 0, "daemon exit status on SIGTERM: \(rig.daemon.output)")
        #expect(rig.daemon.output.contains("control plane stopped"))
        // The frontend was answered: the backend is Closed and the guest saw it.
        #expect(try rig.backendState() == "6")
        #expect(try eventually { guest.output.contains("went Closed during the workload") }, "\(guest.output)")
        #expect(guest.isRunning, "the guest should wait to reconnect: \(guest.output)")

        // The next daemon offers the device again; the guest reconnects and goes on verifying.
        rig.daemon = try Rig.startDaemon(rig.sim)
        #expect(try rig.waitForBackend("4"), "no reconnect: \(rig.daemon.output) \(guest.output)")
        #expect(guest.wait(timeout: 60) == 0, "guest: \(guest.output)")
        let report = Self.report(guest)
        #expect(report["errors"] as? Int == 0 && report["verify_failures"] as? Int == 0, "\(report)")
        #expect(report["reconnects"] as? Int == 1, "\(report)")
        #expect(report["grants_still_mapped"] as? Int == 0, "\(report)")

        // Everything the guest wrote is on disk: a fresh guest reads every block of the region
        // and finds a stamp of an earlier run (zeros fail with --verify-existing).
        let reread = try rig.sim.xensim(["frontend"], ["--domid", "1", "--devid", "51712", "--workload", "read",
                                                       "--verify-existing", "--size", "4M", "--json"], timeout: 60)
        #expect(reread.status == 0, "re-read: \(reread.stdout) \(reread.stderr)")
        #expect(reread.stdout.contains("\"verify_failures\":0") && reread.stdout.contains("\"reads\":1024"), "\(reread.stdout)")
    }

    @Test func sigintEndsAGuestThatDoesNotReconnectWithEveryGrantReturned() throws {
        let rig = try Rig("sigint", attach: true)
        defer { rig.stop() }
        let guest = try rig.guest(["--workload", "randwrite", "--size", "8M", "--seconds", "60", "--no-reconnect"])
        #expect(try rig.waitForBackend("4"), "never Connected: \(rig.daemon.output) \(guest.output)")
        #expect(try rig.waitForStamps(rig.disk, inFirst: 8 << 20, atLeast: 256), "guest: \(guest.output)")

        let status = rig.signalDaemon(SIGINT)
        #expect(status == 0, "daemon exit status on SIGINT: \(rig.daemon.output)")
        #expect(try rig.backendState() == "6")

        // The guest's disk dies as a Linux guest's would: exit 1, an error naming the close,
        // no wrong data, and no grant left mapped by the daemon that went away.
        #expect(guest.wait(timeout: 60) == 1, "guest: \(guest.output)")
        let report = Self.report(guest)
        #expect((report["error"] as? String)?.contains("closed the device") == true, "\(report)")
        #expect(report["verify_failures"] as? Int == 0, "\(report)")
        #expect(report["grants_still_mapped"] as? Int == 0, "\(report)")
        #expect((report["writes"] as? Int ?? 0) > 0, "\(report)")

        // A restarted daemon serves a new guest session on the same device.
        rig.daemon = try Rig.startDaemon(rig.sim)
        let again = try rig.sim.xensim(["frontend"], ["--domid", "1", "--devid", "51712", "--workload", "verify",
                                                      "--bytes", "4M"], timeout: 60)
        #expect(again.status == 0, "verify after restart: \(again.stdout) \(again.stderr) \(rig.daemon.output)")
    }

    /// `scripts/demo.sh --check N` (what `make demo` runs, bounded): simulator, daemon,
    /// attached disk, verified guest; exit 0, and nothing left behind.
    @Test func demoCheckRunsTheVerifiedGuestAndCleansUp() throws {
        let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("scripts/demo.sh").path
        let tmp = try Harness.temporaryDirectory("demo")
        defer { try? FileManager.default.removeItem(at: tmp) }
        // Its own port: the API may be listening for other tests or a demo on 8080.
        let port = 20000 + Int(getpid() % 20000)
        let result = try Harness.run("/bin/bash", [script, "--check", "4"], environment: [
            "DEMO_BIN_DIR": Harness.xensimDirectory.path, "DEMO_LISTEN": "127.0.0.1:\(port)", "TMPDIR": tmp.path,
        ], timeout: 120)
        #expect(result.status == 0, "demo: \(result.stdout) \(result.stderr)")
        #expect(result.stdout.contains("errors 0, verify_failures 0"), "\(result.stdout)")
        #expect(try FileManager.default.contentsOfDirectory(atPath: tmp.path).isEmpty, "the demo left files behind")
    }
}
