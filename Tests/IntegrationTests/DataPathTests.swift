import Foundation
import Testing
import XenSim

/// The data path end to end: blkback-server maps a simulated guest's rings and grants (real
/// shared memory between processes), serves its requests with io_uring on a real file, and
/// lets it go again — the acceptance of "first light".
@Suite(.serialized) struct DataPathTests {
    typealias Rig = DaemonRig

    struct GuestReport {
        let status: Int32
        let json: [String: Any]
        let output: String
        var errors: Int { json["errors"] as? Int ?? -1 }
        var verifyFailures: Int { json["verify_failures"] as? Int ?? -1 }
        var ops: Int { json["ops"] as? Int ?? 0 }
    }

    /// Whether a thread of process `pid` is named `name` within 30 s (a ring's thread names
    /// itself once running, maybe after the backend reached Connected).
    static func waitForThread(named name: String, in pid: Int32) -> Bool {
        let deadline = Date().addingTimeInterval(30)
        repeat {
            let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task")) ?? []
            let names = tasks.compactMap { try? String(contentsOfFile: "/proc/\(pid)/task/\($0)/comm", encoding: .utf8) }
            if names.contains(where: { $0.trimmingCharacters(in: .whitespacesAndNewlines) == name }) { return true }
            usleep(20_000)
        } while Date() < deadline
        return false
    }

    static func guest(_ rig: Rig, domid: Int, _ workload: [String], timeout: TimeInterval = 120) throws -> GuestReport {
        let result = try rig.sim.xensim(["frontend"], ["--domid", "\(domid)", "--devid", "51712", "--json"] + workload,
                                        timeout: timeout)
        return GuestReport(status: result.status, json: DaemonRig.report(result.stdout), output: result.stdout + result.stderr)
    }

    @Test func verifiedWorkloadReachesTheFileAndSurvivesDetachAndReattach() throws {
        let rig = try Rig("data")
        defer { rig.stop() }
        try rig.attach(domid: 1, disk: rig.disk)

        // The backend is Connected while the guest runs.
        let running = try BackgroundProcess(Harness.executable("xensim"), [
            "frontend", "--dir", rig.sim.path, "--domid", "1", "--devid", "51712",
            "--workload", "verify", "--bytes", "32M", "--json"])
        #expect(try rig.waitFor("\(DaemonRig.backend)/state", "4"), "backend never Connected: \(rig.daemon.output)")
        // The ring's thread goes by Linux blkback's name for it, for top -H and perf.
        #expect(Self.waitForThread(named: "1.51712-0", in: rig.daemon.pid), "no thread 1.51712-0 in the daemon")
        #expect(Self.waitForThread(named: "blkback-control", in: rig.daemon.pid), "no thread blkback-control in the daemon")
        #expect(running.wait(timeout: 120) == 0, "verify run: \(running.output)")
        let json: [String: Any]? = DaemonRig.report(running.output)
        #expect(json?["verify_failures"] as? Int == 0)
        #expect(json?["errors"] as? Int == 0)
        #expect((json?["ops"] as? Int ?? 0) >= 2 * (32 << 20) / 4096)

        // The guest closed the device as blkfront does; the stamps are in the backing file.
        #expect(try rig.waitFor("\(DaemonRig.backend)/state", "6"))
        #expect(try DaemonRig.stampedSectors(rig.disk, bytes: 32 << 20) == (32 << 20) / 512)

        // A second guest session reads them back through the daemon.
        let reread = try Self.guest(rig, domid: 1, ["--workload", "read", "--verify-existing", "--bytes", "32M", "--size", "32M"])
        #expect(reread.status == 0 && reread.verifyFailures == 0 && reread.errors == 0, "re-read: \(reread.output)")

        // Detach, attach again on the same daemon, verify again.
        let detach = try rig.sim.xensim(["detach"], ["--domid", "1", "--devid", "51712"], timeout: 30)
        #expect(detach.status == 0, "detach: \(detach.stderr)")
        #expect(try rig.read("\(DaemonRig.backend)/state") == nil)
        try rig.attach(domid: 1, disk: rig.disk)
        let again = try Self.guest(rig, domid: 1, ["--workload", "verify", "--bytes", "8M"])
        #expect(again.status == 0 && again.verifyFailures == 0 && again.errors == 0, "second verify: \(again.output)")
        #expect(rig.daemon.isRunning)
    }

    /// A loop device made with 4096-byte logical sectors is a 4Kn disk: the backend says so
    /// (sector-size, physical-sector-size), the guest's 4 KiB I/O verifies, and its discards
    /// reach the device. Needs root and the loop driver, as serving block devices does.
    @Test(.enabled(if: getuid() == 0 && FileManager.default.fileExists(atPath: "/dev/loop-control"), "needs root and /dev/loop-control"))
    func aDiskWith4KSectorsIsServedAsOneAndTakesDiscards() throws {
        let rig = try Rig("4kn")
        defer { rig.stop() }
        let image = rig.sim.directory.appendingPathComponent("4kn.img").path
        #expect(FileManager.default.createFile(atPath: image, contents: nil) && truncate(image, 32 << 20) == 0)
        let setup = try Harness.run("losetup", ["--find", "--show", "--sector-size", "4096", "--direct-io=on", image], timeout: 30)
        try #require(setup.status == 0, "losetup: \(setup.stderr)")
        let loop = setup.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        defer { _ = try? Harness.run("losetup", ["-d", loop], timeout: 30) }
        try rig.attach(domid: 1, disk: loop)
        let run = try Self.guest(rig, domid: 1, ["--workload", "verify", "--bs", "4k", "--bytes", "8M"])
        #expect(run.status == 0 && run.errors == 0 && run.verifyFailures == 0, "guest: \(run.output)")
        let negotiated = run.json["negotiated"] as? [String: Any]
        #expect(negotiated?["sector_size"] as? Int == 4096 && negotiated?["physical_sector_size"] as? Int == 4096, "\(String(describing: negotiated))")
        #expect(negotiated?["sectors"] as? Int == (32 << 20) / 512, "sectors stay in 512-byte units")
        #expect(try rig.read("\(DaemonRig.backend)/physical-sector-size") == "4096")

        // The loop device takes discards: offered with its queue's granularity, and a guest's
        // DISCARD of the first 8 MiB reaches it (loop punches holes: the image reads zeros).
        #expect(try rig.read("\(DaemonRig.backend)/feature-discard") == "1")
        #expect(try rig.read("\(DaemonRig.backend)/discard-granularity") == "4096")
        // A loop device has no secure erase; the BLKSECDISCARD probe must say so.
        #expect(try rig.read("\(DaemonRig.backend)/discard-secure") == "0")
        let discard = try Self.guest(rig, domid: 1, ["--workload", "discard", "--bs", "1M", "--bytes", "8M"])
        #expect(discard.status == 0 && discard.errors == 0 && discard.json["discards"] as? Int == 8, "discard: \(discard.output)")
        let file = try FileHandle(forReadingFrom: URL(fileURLWithPath: image))
        defer { try? file.close() }
        #expect((try file.read(upToCount: 8 << 20) ?? Data()).allSatisfy { $0 == 0 }, "the discarded range does not read as zeros")
        // Requests that are not whole 4 KiB blocks are refused (RingValidationTests); the
        // guest's own check keeps a 512-byte workload from being issued at all.
        let misaligned = try Self.guest(rig, domid: 1, ["--workload", "read", "--bs", "512", "--bytes", "4k"])
        #expect(misaligned.status != 0 && misaligned.output.contains("sector size 4096"), "\(misaligned.output)")
        #expect(rig.daemon.isRunning)
    }

    @Test func aKilledDaemonsGrantMappingsAreReleasedByTheHypervisor() throws {
        let rig = try Rig("killed-daemon", attach: true)
        defer { rig.stop() }
        let guest = try rig.guest(["--workload", "randrw", "--seconds", "3600"])
        defer { guest.stop(signal: SIGKILL, grace: 1) }
        #expect(try rig.waitForBackend("4"), "backend never Connected: \(rig.daemon.output)")
        #expect(try rig.waitForStamps(rig.disk, inFirst: 64 << 20, atLeast: 64))
        let grants = try GuestGrantTable(directory: rig.sim.path, domid: 1)
        let refs = 0..<UInt32(grants.entryCount)
        #expect(refs.contains(where: grants.isMappedByBackend), "the serving daemon maps the guest's ring")

        // SIGKILL: nothing of the daemon's own teardown runs. As Xen does when a process's
        // gntdev handle closes, the simulated hypervisor releases its mappings.
        _ = rig.signalDaemon(SIGKILL)
        #expect(try eventually { !refs.contains(where: grants.isMappedByBackend) },
                "grants still mapped after the daemon died: \(refs.filter(grants.isMappedByBackend).prefix(8))")
        rig.daemon = try DaemonRig.startDaemon(rig.sim)
    }

    @Test func killedGuestAndDestroyedDomainReleaseTheDeviceWhileAnotherGuestIsServed() throws {
        let rig = try Rig("destroy")
        defer { rig.stop() }
        try rig.attach(domid: 1, disk: rig.disk)
        #expect(try rig.sim.xensim(["domain", "create"], ["--domid", "2"]).status == 0)
        let disk2 = rig.sim.directory.appendingPathComponent("disk2.img").path
        #expect(FileManager.default.createFile(atPath: disk2, contents: nil) && truncate(disk2, 32 << 20) == 0)
        try rig.attach(domid: 2, disk: disk2)

        let honest = try BackgroundProcess(Harness.executable("xensim"), [
            "frontend", "--dir", rig.sim.path, "--domid", "2", "--devid", "51712",
            "--workload", "randrw", "--bytes", "16M", "--json"])
        let victim = try rig.guest(["--workload", "randwrite", "--size", "4M", "--seconds", "120"])
        #expect(try rig.waitForBackend("4"))
        // Killed mid-workload: its writes are reaching the disk, so requests are in flight.
        #expect(try rig.waitForStamps(rig.disk, inFirst: 4 << 20, atLeast: 64), "victim: \(victim.output)")
        victim.stop(signal: SIGKILL, grace: 5)

        // What `xl destroy` does: the daemon lets go of the dead guest's rings and answers the
        // toolstack's Closing with Closed, so the toolstack never waits out libxl's timeout.
        let destroy = try rig.sim.xensim(["domain", "destroy"], ["--domid", "1"], timeout: 60)
        #expect(destroy.status == 0, "destroy: \(destroy.stderr)")
        #expect(!destroy.stderr.contains("did not close"), "destroy waited for a backend that never closed: \(destroy.stderr) daemon: \(rig.daemon.output)")
        #expect(try rig.read(DaemonRig.backend) == nil)
        #expect(try eventually { rig.daemon.output.contains("vbd=vbd/1/51712") && rig.daemon.output.contains("device unregistered") })

        // The other guest was served throughout.
        #expect(honest.wait(timeout: 120) == 0, "honest guest: \(honest.output)")
        #expect(honest.output.contains("\"errors\":0") && honest.output.contains("\"verify_failures\":0"), "\(honest.output)")

        // A new domain 1 with a new attach is served by the same daemon.
        #expect(try rig.sim.xensim(["domain", "create"], ["--domid", "1"]).status == 0)
        try rig.attach(domid: 1, disk: rig.disk)
        let fresh = try Self.guest(rig, domid: 1, ["--workload", "verify", "--bytes", "4M"])
        #expect(fresh.status == 0 && fresh.verifyFailures == 0, "fresh guest: \(fresh.output)")
        #expect(rig.daemon.isRunning)
    }

    /// The race behind the toolstack's 10 s timeouts, made deterministic: the frontend vanishes
    /// first (the daemon unregisters the device and writes Closed), and only then does a
    /// toolstack write online=0 and Closing over that Closed. The daemon, no longer serving the
    /// device, must still answer Closed, as xenbus_dev_remove answers Closing.
    @Test func closingWrittenAfterTheFrontendVanishedIsAnsweredWithClosed() throws {
        let rig = try Rig("late-closing", attach: true)
        defer { rig.stop() }
        let victim = try rig.guest(["--workload", "randwrite", "--size", "4M", "--seconds", "120"])
        #expect(try rig.waitForBackend("4"))
        #expect(try rig.waitForStamps(rig.disk, inFirst: 4 << 20, atLeast: 64), "victim: \(victim.output)")
        victim.stop(signal: SIGKILL, grace: 5)

        #expect(try rig.sim.xenstore("xenstore-rm", [DaemonRig.frontend]).status == 0)
        #expect(try rig.waitForBackend("6"), "no Closed after the frontend vanished: \(rig.daemon.output)")
        #expect(try eventually { rig.daemon.output.contains("device unregistered") })

        // Two separate writes, Closing last: exactly what the daemon's Closed used to lose to.
        #expect(try rig.sim.xenstore("xenstore-write", ["\(DaemonRig.backend)/online", "0"]).status == 0)
        #expect(try rig.sim.xenstore("xenstore-write", ["\(DaemonRig.backend)/state", "5"]).status == 0)
        #expect(try rig.waitForBackend("6"), "Closing was never answered: \(rig.daemon.output)")

        // The toolstack's own detach now completes without a timeout warning.
        let detach = try rig.sim.xensim(["detach"], ["--domid", "1", "--devid", "51712"], timeout: 60)
        #expect(detach.status == 0 && !detach.stderr.contains("did not close"), "detach: \(detach.stderr)")
        #expect(try rig.read(DaemonRig.backend) == nil)
        #expect(rig.daemon.isRunning)
    }
}
