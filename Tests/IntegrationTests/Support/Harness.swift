import Foundation
import Testing

/// Runs the package's own executables as separate processes, the way operators do, and
/// cleans up after every test: each process started here is ended by its pid.
enum Harness {
    /// Directory holding the built products (swift build puts them next to the test bundle).
    static let binDirectory: URL = {
        if let explicit = ProcessInfo.processInfo.environment["BLKBACK_BIN_DIR"] {
            return URL(fileURLWithPath: explicit)
        }
        var url = URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath()
        while url.path != "/" {
            url.deleteLastPathComponent()
            if FileManager.default.isExecutableFile(atPath: url.appendingPathComponent("xensim").path) { return url }
        }
        // Fallback: the package's debug build folder, found from this source file.
        return URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent(".build/debug")
    }()

    /// Where the simulator's tools come from: BLKBACK_XENSIM_DIR when set, else with the rest.
    /// scripts/tsan.sh points it at an uninstrumented build: libxenstore cancels its watch
    /// thread in xs_close, which ThreadSanitizer takes for a thread ending with ignores enabled.
    static let xensimDirectory: URL = ProcessInfo.processInfo.environment["BLKBACK_XENSIM_DIR"]
        .map { URL(fileURLWithPath: $0) } ?? binDirectory

    static func executable(_ name: String) -> String {
        (name == "xensim" ? xensimDirectory : binDirectory).appendingPathComponent(name).path
    }

    struct Result {
        let status: Int32
        let stdout: String
        let stderr: String
    }

    /// Runs a program to completion (bounded by `timeout` seconds; then it is killed).
    @discardableResult
    static func run(_ program: String, _ arguments: [String], environment: [String: String] = [:],
                    timeout: TimeInterval = 60) throws -> Result {
        let child = try BackgroundProcess(program.hasPrefix("/") ? program : try which(program), arguments,
                                          environment: environment)
        let status = child.wait(timeout: timeout)
        let (stdout, stderr) = child.finishOutput()
        return Result(status: status, stdout: stdout, stderr: stderr)
    }

    static func which(_ name: String) throws -> String {
        for dir in (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin").split(separator: ":") {
            let candidate = "\(dir)/\(name)"
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        }
        throw HarnessError("\(name) not found in PATH")
    }

    /// A fresh directory under /tmp, removed by `remove()`.
    static func temporaryDirectory(_ label: String) throws -> URL {
        let url = URL(fileURLWithPath: NSTemporaryDirectory())
            .appendingPathComponent("blkback-\(label)-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
        return url
    }
}

struct HarnessError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// Collects a pipe's output on a background thread.
final class OutputCollector: @unchecked Sendable {
    private var data = Data()
    private let lock = NSLock()
    private let done = DispatchSemaphore(value: 0)

    init(_ handle: FileHandle) {
        Thread.detachNewThread { [self] in
            while true {
                let chunk = handle.availableData
                if chunk.isEmpty { break }
                lock.withLock { data.append(chunk) }
            }
            done.signal()
        }
    }

    func finish() -> String {
        awaitEnd()
        return lock.withLock { String(decoding: data, as: UTF8.self) }
    }

    /// Waits (at most `seconds`) until the pipe reached its end: everything the process wrote
    /// has been collected. The pipe can outlive the process only through a child it left.
    func awaitEnd(seconds: TimeInterval = .infinity) {
        let deadline: DispatchTime = seconds.isFinite ? .now() + seconds : .distantFuture
        if done.wait(timeout: deadline) == .success { done.signal() }
    }

    func snapshot() -> String { lock.withLock { String(decoding: data, as: UTF8.self) } }
}

/// A long-running child (blkback-server, a guest frontend): started now, ended by pid.
final class BackgroundProcess: @unchecked Sendable {
    let process = Process()
    private let stdout: OutputCollector
    private let stderr: OutputCollector

    init(_ program: String, _ arguments: [String], environment: [String: String] = [:]) throws {
        process.executableURL = URL(fileURLWithPath: program)
        process.arguments = arguments
        // XENSTORED_PATH only when a test gives it: in-process suites point this process's own
        // at a socket of theirs (XenSimTests' openXenStore), which no child should inherit.
        var inherited = ProcessInfo.processInfo.environment
        inherited["XENSTORED_PATH"] = nil
        process.environment = inherited.merging(environment) { $1 }
        let out = Pipe(), err = Pipe()
        process.standardOutput = out
        process.standardError = err
        // Children never read the test runner's stdin (openssl s_client would wait on it).
        process.standardInput = FileHandle.nullDevice
        try process.run()
        stdout = OutputCollector(out.fileHandleForReading)
        stderr = OutputCollector(err.fileHandleForReading)
    }

    var pid: Int32 { process.processIdentifier }

    /// Everything the process wrote, once it has ended (waits for its pipes to close).
    func finishOutput() -> (stdout: String, stderr: String) { (stdout.finish(), stderr.finish()) }
    var isRunning: Bool { process.isRunning }
    var output: String { stdout.snapshot() + stderr.snapshot() }

    /// Waits up to `timeout` seconds for the process to end by itself (then SIGKILLs it).
    @discardableResult
    func wait(timeout: TimeInterval) -> Int32 {
        let deadline = Date().addingTimeInterval(timeout)
        while process.isRunning && Date() < deadline { usleep(10_000) }
        return stop(signal: SIGKILL, grace: 1)
    }

    /// Sends `signal`, waits up to `grace` seconds, then SIGKILLs. Returns the exit status.
    @discardableResult
    func stop(signal: Int32 = SIGTERM, grace: TimeInterval = 10) -> Int32 {
        if process.isRunning { kill(pid, signal) }
        let deadline = Date().addingTimeInterval(grace)
        while process.isRunning && Date() < deadline { usleep(10_000) }
        if process.isRunning { kill(pid, SIGKILL) }
        process.waitUntilExit()
        // `output` after the exit must hold all of it: the collectors may still be reading.
        stdout.awaitEnd(seconds: 10)
        stderr.awaitEnd(seconds: 10)
        return process.terminationStatus
    }

    deinit { if process.isRunning { stop(signal: SIGKILL, grace: 1) } }
}

/// A simulator started with `xensim run --detach` in its own directory; `stop()` ends it
/// (`xensim stop`, then by pid if it did not go) and removes the directory.
final class Simulator: @unchecked Sendable {
    let directory: URL
    var path: String { directory.path }
    var xenstoredSocket: String { directory.appendingPathComponent("xenstored.sock").path }
    /// Environment that points libxenstore and xenstore-utils at this simulator as dom0.
    var dom0Environment: [String: String] { ["XENSTORED_PATH": xenstoredSocket] }
    func guestEnvironment(_ domid: Int) -> [String: String] {
        ["XENSTORED_PATH": directory.appendingPathComponent("dom\(domid).sock").path]
    }

    init(_ label: String = "sim") throws {
        directory = try Harness.temporaryDirectory(label)
        let result = try Harness.run(Harness.executable("xensim"), ["run", "--dir", directory.path, "--detach"], timeout: 30)
        guard result.status == 0 else {
            throw HarnessError("xensim run failed (\(result.status)): \(result.stderr)")
        }
    }

    /// Runs an xensim subcommand against this simulator (`--dir` is added after the verb).
    @discardableResult
    func xensim(_ verb: [String], _ arguments: [String] = [], timeout: TimeInterval = 60) throws -> Harness.Result {
        try Harness.run(Harness.executable("xensim"), verb + ["--dir", path] + arguments, timeout: timeout)
    }

    /// Runs a xenstore-utils command as dom0 (or as guest `domid`).
    @discardableResult
    func xenstore(_ tool: String, _ arguments: [String], asDomain domid: Int? = nil) throws -> Harness.Result {
        try Harness.run(tool, arguments, environment: domid.map(guestEnvironment) ?? dom0Environment, timeout: 60)
    }

    func stop() {
        let pidFile = directory.appendingPathComponent("xensim.pid").path
        let pid = (try? String(contentsOfFile: pidFile, encoding: .utf8)).flatMap { Int32($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
        _ = try? xensim(["stop"], timeout: 15)
        if let pid, kill(pid, 0) == 0 {
            kill(pid, SIGKILL)
        }
        try? FileManager.default.removeItem(at: directory)
    }

    deinit { stop() }
}

/// Polls `condition` every 20 ms until it holds or `timeout` seconds pass. The timeout only
/// ends a test whose event never comes: generous, never a speed claim.
func eventually(timeout: TimeInterval = 60, _ condition: () throws -> Bool) rethrows -> Bool {
    let deadline = Date().addingTimeInterval(timeout)
    repeat {
        if try condition() { return true }
        usleep(20_000)
    } while Date() < deadline
    return false
}
