import Foundation
import Testing
import Xenbus

/// The daemon's life as an operator sees it: SIGTERM hands connected guests over to the next
/// daemon and SIGINT closes them (both stop taking requests, answer what is in flight and
/// exit 0 within 10 s), crashes the guests do not notice, and the demo the README starts.
@Suite(.serialized) struct DaemonLifecycleTests {
    typealias Rig = DaemonRig
    static let backend = DaemonRig.backend

    static func report(_ process: BackgroundProcess) -> [String: Any] { DaemonRig.report(process.output) }

    @Test func sigtermMidWorkloadHandsTheGuestOverToTheNextDaemon() throws {
        let rig = try Rig("handover", attach: true)
        defer { rig.stop() }
        // A small region: after the restart nearly every block is read again, so a write the
        // guest saw acknowledged and the handover lost would be a verification failure. The
        // guest does not reconnect: a disk that closed would end it with an error.
        let guest = try rig.guest(["--workload", "randrw", "--size", "4M", "--qd", "32", "--flush-every", "64",
                                   "--seconds", "10", "--no-reconnect"])
        #expect(try rig.waitForBackend("4"), "never Connected: \(rig.daemon.output) \(guest.output)")
        // Mid-workload: a good part of the region already holds the guest's writes.
        #expect(try rig.waitForStamps(rig.disk, inFirst: 4 << 20, atLeast: 1024), "guest: \(guest.output)")

        let status = rig.signalDaemon(SIGTERM)
        #expect(status == 0, "daemon exit status on SIGTERM: \(rig.daemon.output)")
        #expect(rig.daemon.output.contains("rings left to the next daemon"), "\(rig.daemon.output)")
        // Nothing the guest would act on was written: the device is still Connected.
        #expect(try rig.backendState() == "4")

        // The next daemon takes the rings over; the guest goes on as if nothing happened.
        rig.daemon = try Rig.startDaemon(rig.sim)
        #expect(guest.wait(timeout: 120) == 0, "guest: \(guest.output) daemon: \(rig.daemon.output)")
        #expect(rig.daemon.output.contains("took over the connected device"), "\(rig.daemon.output)")
        let report = Self.report(guest)
        #expect(report["errors"] as? Int == 0 && report["verify_failures"] as? Int == 0, "\(report)")
        #expect(report["reconnects"] as? Int == 0, "\(report)")
        #expect(report["grants_still_mapped"] as? Int == 0, "\(report)")

        // Everything the guest wrote is on disk: a fresh guest reads every block of the region
        // and finds a stamp of an earlier run (zeros fail with --verify-existing).
        let reread = try rig.sim.xensim(["frontend"], ["--domid", "1", "--devid", "51712", "--workload", "read",
                                                       "--verify-existing", "--size", "4M", "--json"], timeout: 60)
        #expect(reread.status == 0, "re-read: \(reread.stdout) \(reread.stderr)")
        #expect(reread.stdout.contains("\"verify_failures\":0") && reread.stdout.contains("\"reads\":1024"), "\(reread.stdout)")
    }

    /// The daemon SIGKILLed again and again at random moments (and once restarted for an
    /// upgrade) under a verifying guest that never reconnects: every request is answered,
    /// every read verifies.
    @Test func aDaemonKilledAgainAndAgainLosesNoRequest() throws {
        let rig = try Rig("crashes", attach: true)
        defer { rig.stop() }
        let guest = try rig.guest(["--workload", "randrw", "--size", "8M", "--qd", "16", "--flush-every", "32",
                                   "--seconds", "8", "--queues", "2", "--no-reconnect"])
        #expect(try rig.waitForBackend("4"), "never Connected: \(rig.daemon.output) \(guest.output)")
        #expect(try rig.waitForStamps(rig.disk, inFirst: 8 << 20, atLeast: 256), "guest: \(guest.output)")
        var generator = SystemRandomNumberGenerator()
        for round in 0..<6 {
            // A random moment, not a synchronisation: any instant must be safe.
            usleep(UInt32.random(in: 20_000...400_000, using: &generator))
            _ = rig.signalDaemon(round == 3 ? SIGTERM : SIGKILL)
            rig.daemon = try Rig.startDaemon(rig.sim)
        }
        #expect(guest.wait(timeout: 120) == 0, "guest: \(guest.output) daemon: \(rig.daemon.output)")
        let report = Self.report(guest)
        #expect(report["errors"] as? Int == 0 && report["verify_failures"] as? Int == 0, "\(report)")
        #expect(report["reconnects"] as? Int == 0, "\(report)")
        let latency = report["lat_us"] as? [String: Any]
        print("longest request across 6 restarts: \(latency?["max"] ?? "?") us")
    }

    /// A journal that cannot be trusted, or a frontend that changed its rings while no daemon
    /// ran: the device is closed the normal way (Closing), never served with wrong data.
    @Test(arguments: ["corrupt journal", "changed ring-ref"])
    func anUntrustworthyTakeoverClosesTheDevice(_ damage: String) throws {
        let rig = try Rig("takeover-refused", attach: true)
        defer { rig.stop() }
        let guest = try rig.guest(["--workload", "randrw", "--size", "4M", "--seconds", "3600", "--no-reconnect"])
        defer { guest.stop(signal: SIGKILL, grace: 1) }
        #expect(try rig.waitForBackend("4"), "never Connected: \(rig.daemon.output) \(guest.output)")
        #expect(try rig.waitForStamps(rig.disk, inFirst: 4 << 20, atLeast: 64), "guest: \(guest.output)")
        #expect(rig.signalDaemon(SIGTERM) == 0)
        let journal = rig.sim.path + "/blkback-server/vbd-1-51712-ring0.journal"
        switch damage {
        case "corrupt journal":
            let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: journal))
            try handle.write(contentsOf: Data(repeating: 0x5A, count: 64))
            try handle.close()
        default:
            let ref = try #require(try rig.read("\(DaemonRig.frontend)/ring-ref"))
            #expect(try rig.sim.xenstore("xenstore-write", ["\(DaemonRig.frontend)/ring-ref", "\((UInt32(ref) ?? 0) + 1)"]).status == 0)
        }
        rig.daemon = try Rig.startDaemon(rig.sim)
        #expect(try rig.waitForBackend("5"), "the device was not closed: \(rig.daemon.output)")
        let error = try rig.read("/local/domain/0/error/backend/vbd/1/51712/error") ?? ""
        #expect(error.contains("taking over"), "error node: \(error)")
        #expect(!rig.daemon.output.contains("took over the connected device"), "\(rig.daemon.output)")
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

    @Test(arguments: ["blkback-server", "xensim"])
    func versionIsPrintedAndExitsZero(_ binary: String) throws {
        let result = try Harness.run(Harness.executable(binary), ["--version"], timeout: 20)
        #expect(result.status == 0, "\(binary) --version: \(result.stderr)")
        #expect(result.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == BlkbackVersion.string)
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
