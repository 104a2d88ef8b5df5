import Foundation
import Testing

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

    func waitFor(_ path: String, _ value: String?, timeout: TimeInterval = 10) throws -> Bool {
        try eventually(timeout: timeout) { try read(path) == value }
    }

    func backendState() throws -> String? { try read("\(Self.backend)/state") }

    func waitForBackend(_ state: String, timeout: TimeInterval = 20) throws -> Bool {
        try waitFor("\(Self.backend)/state", state, timeout: timeout)
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

    /// Sends `signal` to the daemon; returns its exit status and how long it took to exit.
    func signalDaemon(_ signal: Int32) -> (status: Int32, seconds: TimeInterval) {
        let sent = Date()
        let status = daemon.stop(signal: signal, grace: 15)
        return (status, Date().timeIntervalSince(sent))
    }

    func stop() {
        #expect(daemon.stop() == 0, "blkback-server did not exit 0 on SIGTERM: \(daemon.output)")
        sim.stop()
    }
}
