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

    static func guest(_ rig: Rig, domid: Int, _ workload: [String], timeout: TimeInterval = 120) throws -> GuestReport {
        let result = try rig.sim.xensim(["frontend"], ["--domid", "\(domid)", "--devid", "51712", "--json"] + workload,
                                        timeout: timeout)
        return GuestReport(status: result.status, json: DaemonRig.report(result.stdout), output: result.stdout + result.stderr)
    }

    /// Counts the sectors of `path` that hold a valid stamp, by reading the file directly.
    static func stampedSectors(_ path: String, bytes: Int) throws -> Int {
        let data = try Data(contentsOf: URL(fileURLWithPath: path)).prefix(bytes)
        return data.withUnsafeBytes { raw in
            (0..<(raw.count / SectorStamp.sectorSize)).filter { sector in
                if case .stamp = SectorStamp.check(sector: UInt64(sector), at: raw.baseAddress! + sector * SectorStamp.sectorSize) {
                    return true
                }
                return false
            }.count
        }
    }

    @Test func verifiedWorkloadReachesTheFileAndSurvivesDetachAndReattach() throws {
        let rig = try Rig("data")
        defer { rig.stop() }
        try rig.attach(domid: 1, disk: rig.disk)

        // The backend is Connected while the guest runs.
        let running = try BackgroundProcess(Harness.executable("xensim"), [
            "frontend", "--dir", rig.sim.path, "--domid", "1", "--devid", "51712",
            "--workload", "verify", "--bytes", "32M", "--json"])
        #expect(try rig.waitFor("\(DaemonRig.backend)/state", "4", timeout: 20), "backend never Connected: \(rig.daemon.output)")
        #expect(running.wait(timeout: 120) == 0, "verify run: \(running.output)")
        let json: [String: Any]? = DaemonRig.report(running.output)
        #expect(json?["verify_failures"] as? Int == 0)
        #expect(json?["errors"] as? Int == 0)
        #expect((json?["ops"] as? Int ?? 0) >= 2 * (32 << 20) / 4096)

        // The guest closed the device as blkfront does; the stamps are in the backing file.
        #expect(try rig.waitFor("\(DaemonRig.backend)/state", "6"))
        #expect(try Self.stampedSectors(rig.disk, bytes: 32 << 20) == (32 << 20) / 512)

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
            "--workload", "randrw", "--seconds", "6", "--json"])
        let victim = try BackgroundProcess(Harness.executable("xensim"), [
            "frontend", "--dir", rig.sim.path, "--domid", "1", "--devid", "51712",
            "--workload", "randwrite", "--seconds", "60"])
        #expect(try rig.waitFor("\(DaemonRig.backend)/state", "4", timeout: 20))
        usleep(500_000)
        victim.stop(signal: SIGKILL, grace: 5)

        // What `xl destroy` does: the daemon lets go of the dead guest's rings and forgets it.
        let started = Date()
        let destroy = try rig.sim.xensim(["domain", "destroy"], ["--domid", "1"], timeout: 30)
        #expect(destroy.status == 0, "destroy: \(destroy.stderr)")
        #expect(Date().timeIntervalSince(started) < 8, "the backend should close without waiting for libxl's timeout")
        #expect(try rig.read(DaemonRig.backend) == nil)
        #expect(try eventually { rig.daemon.output.contains("vbd=vbd/1/51712") && rig.daemon.output.contains("device unregistered") })

        // The other guest was served throughout.
        #expect(honest.wait(timeout: 60) == 0, "honest guest: \(honest.output)")
        #expect(honest.output.contains("\"errors\":0") && honest.output.contains("\"verify_failures\":0"), "\(honest.output)")

        // A new domain 1 with a new attach is served by the same daemon.
        #expect(try rig.sim.xensim(["domain", "create"], ["--domid", "1"]).status == 0)
        try rig.attach(domid: 1, disk: rig.disk)
        let fresh = try Self.guest(rig, domid: 1, ["--workload", "verify", "--bytes", "4M"])
        #expect(fresh.status == 0 && fresh.verifyFailures == 0, "fresh guest: \(fresh.output)")
        #expect(rig.daemon.isRunning)
    }
}
