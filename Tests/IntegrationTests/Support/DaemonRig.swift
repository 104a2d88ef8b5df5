import Foundation
import Testing
import XenSim

/// A simulator with domain 1 and a 64 MiB disk file, served by a blkback-server that a test
/// may replace; `stop()` checks the daemon exits 0 on SIGTERM and ends everything by pid.
final class DaemonRig {
    static let backend = "/local/domain/0/backend/vbd/1/51712"
    static let frontend = "/local/domain/1/device/vbd/51712"

    let sim: Simulator
    let disk: String
    var daemon: BackgroundProcess

    /// `attach`: also attach the disk as domain 1's xvda (and expect the attach to succeed).
    init(_ label: String, attach: Bool = false) throws {
        sim = try Simulator(label)
        daemon = try Self.startDaemon(sim)
        disk = sim.directory.appendingPathComponent("disk.img").path
        #expect(FileManager.default.createFile(atPath: disk, contents: nil) && truncate(disk, 64 << 20) == 0)
        let created = try sim.xensim(["domain", "create"], ["--domid", "1"])
        #expect(created.status == 0, "domain create: \(created.stderr)")
        if attach { try self.attach(domid: 1, disk: disk) }
    }

    static func startDaemon(_ sim: Simulator) throws -> BackgroundProcess {
        try BackgroundProcess(Harness.executable("blkback-server"), ["--sim", sim.path, "--log-level", "debug"])
    }

    func attach(domid: Int, disk: String) throws {
        let attach = try sim.xensim(["attach"], ["--domid", "\(domid)", "--devid", "51712", "--target", disk])
        #expect(attach.status == 0, "attach dom\(domid): \(attach.stderr) daemon: \(daemon.output)")
    }

    /// A xenstore node as dom0 reads it; nil when it does not exist.
    func read(_ path: String) throws -> String? {
        let result = try sim.xenstore("xenstore-read", [path])
        return result.status == 0 ? result.stdout.trimmingCharacters(in: .newlines) : nil
    }

    func waitFor(_ path: String, _ value: String?, timeout: TimeInterval = 60) throws -> Bool {
        try eventually(timeout: timeout) { try read(path) == value }
    }

    func backendState() throws -> String? { try read("\(Self.backend)/state") }

    func waitForBackend(_ state: String, timeout: TimeInterval = 60) throws -> Bool {
        try waitFor("\(Self.backend)/state", state, timeout: timeout)
    }

    /// Counts the sectors of `path` that hold a valid stamp, by reading the file directly.
    static func stampedSectors(_ path: String, bytes: Int) throws -> Int {
        let handle = try FileHandle(forReadingFrom: URL(fileURLWithPath: path))
        defer { try? handle.close() }
        let data = try handle.read(upToCount: bytes) ?? Data()
        return data.withUnsafeBytes { raw in
            (0..<(raw.count / SectorStamp.sectorSize)).filter { sector in
                if case .stamp = SectorStamp.check(sector: UInt64(sector), at: raw.baseAddress! + sector * SectorStamp.sectorSize) {
                    return true
                }
                return false
            }.count
        }
    }

    /// Waits until a guest's writes have reached `disk`: at least `sectors` stamped sectors in
    /// its first `bytes`. The event a test needs before it interrupts a guest mid-workload.
    func waitForStamps(_ disk: String, inFirst bytes: Int, atLeast sectors: Int, timeout: TimeInterval = 60) throws -> Bool {
        try eventually(timeout: timeout) { try Self.stampedSectors(disk, bytes: bytes) >= sectors }
    }

    /// A guest (`xensim frontend --json`) of domain `domid` running in the background.
    func guest(_ arguments: [String], domid: Int = 1) throws -> BackgroundProcess {
        try BackgroundProcess(Harness.executable("xensim"), [
            "frontend", "--dir", sim.path, "--domid", "\(domid)", "--devid", "51712", "--json"] + arguments)
    }

    /// The JSON report a frontend printed (its stdout's object line).
    static func report(_ output: String) -> [String: Any] {
        let line = output.split(separator: "\n").first { $0.hasPrefix("{") }.map(String.init) ?? ""
        return (try? JSONSerialization.jsonObject(with: Data(line.utf8))) as? [String: Any] ?? [:]
    }

    /// Sends `signal` to the daemon and returns its exit status. The daemon bounds its own
    /// drain (within 10 s); the generous wait here only keeps a hung daemon from hanging the
    /// test, which then sees SIGKILL's status instead of 0.
    func signalDaemon(_ signal: Int32) -> Int32 {
        daemon.stop(signal: signal, grace: 60)
    }

    func stop() {
        #expect(daemon.stop() == 0, "blkback-server did not exit 0 on SIGTERM: \(daemon.output)")
        sim.stop()
    }
}
