import Foundation
import Testing

/// A port on 127.0.0.1 that was free a moment ago (bound to port 0, then released).
func freeLoopbackPort() throws -> UInt16 {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { throw HarnessError("socket failed") }
    defer { close(fd) }
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_addr.s_addr = inet_addr("127.0.0.1")
    var length = socklen_t(MemoryLayout<sockaddr_in>.size)
    let bound = withUnsafeMutablePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { pointer in
            bind(fd, pointer, length) == 0 && getsockname(fd, pointer, &length) == 0
        }
    }
    guard bound else { throw HarnessError("bind to 127.0.0.1:0 failed") }
    return UInt16(bigEndian: address.sin_port)
}

/// One HTTP exchange made with curl, as an operator would.
struct HTTPExchange {
    let status: Int
    let headers: [String: String]
    let body: String

    /// The body as a JSON object (nil if it is not one).
    var json: [String: Any]? { (try? JSONSerialization.jsonObject(with: Data(body.utf8))) as? [String: Any] }
    var error: String? { json?["error"] as? String }
}

/// A simulator, a daemon with its API on a free loopback port, domain 1 and an attached disk.
final class APIRig: @unchecked Sendable {
    let sim: Simulator
    let daemon: BackgroundProcess
    let disk: String
    let port: UInt16
    let scheme: String
    private(set) var guest: BackgroundProcess?
    static let vbd = "/v1/vbds/1/51712"

    init(_ label: String, daemonArguments: [String] = [], scheme: String = "http", attach: Bool = true) throws {
        sim = try Simulator(label)
        disk = sim.directory.appendingPathComponent("disk.img").path
        #expect(FileManager.default.createFile(atPath: disk, contents: nil))
        #expect(truncate(disk, 64 << 20) == 0)
        var started: (BackgroundProcess, UInt16)?
        // The port was free a moment ago; another test may take it first, so try again.
        for _ in 0..<5 where started == nil {
            let port = try freeLoopbackPort()
            let daemon = try BackgroundProcess(Harness.executable("blkback-server"),
                                               ["--sim", sim.path, "--listen", "127.0.0.1:\(port)"] + daemonArguments)
            if eventually({ daemon.output.contains("HTTP API listening") || !daemon.isRunning }), daemon.isRunning {
                started = (daemon, port)
            } else {
                daemon.stop(signal: SIGKILL, grace: 1)
            }
        }
        guard let started else { sim.stop(); throw HarnessError("blkback-server did not start its API") }
        (daemon, port) = started
        self.scheme = scheme
        if attach {
            let created = try sim.xensim(["domain", "create"], ["--domid", "1"])
            #expect(created.status == 0, "domain create: \(created.stderr)")
            let attached = try sim.xensim(["attach"], ["--domid", "1", "--devid", "51712", "--target", disk])
            #expect(attached.status == 0, "attach: \(attached.stderr) daemon: \(daemon.output)")
        }
    }

    var base: String { "\(scheme)://127.0.0.1:\(port)" }

    /// Runs domain 1's frontend to its end (`arguments`: the workload); its exit status and
    /// JSON report.
    func runFrontend(_ arguments: [String], timeout: TimeInterval = 180) throws -> (Int32, [String: Any]) {
        let result = try sim.xensim(["frontend"], ["--domid", "1", "--devid", "51712", "--json"] + arguments, timeout: timeout)
        return (result.status, DaemonRig.report(result.stdout))
    }

    /// Starts the guest's blkfront with a verified random read/write workload (`extra`: more
    /// of `xensim frontend`'s options).
    func startGuest(seconds: Int = 120, _ extra: [String] = []) throws {
        guest = try BackgroundProcess(Harness.executable("xensim"),
                                      ["frontend", "--dir", sim.path, "--domid", "1", "--devid", "51712",
                                       "--workload", "randrw", "--seconds", "\(seconds)", "--json"] + extra)
    }

    /// Ends the guest with SIGINT; its exit status and JSON report.
    func stopGuest() -> (status: Int32, report: [String: Any]?) {
        guard let guest else { return (-1, nil) }
        let status = guest.stop(signal: SIGINT, grace: 15)
        let line = guest.output.split(separator: "\n").last { $0.hasPrefix("{") }
        let report = line.flatMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] }
        self.guest = nil
        return (status, report)
    }

    /// One request through curl. `body` goes verbatim (a file keeps binary bytes intact).
    func request(_ method: String, _ path: String, body: [UInt8]? = nil, headers: [String] = [],
                 curlArguments: [String] = []) throws -> HTTPExchange {
        var arguments = ["-sS", "-X", method, "-D", "-", "--max-time", "30"] + curlArguments
        if method == "HEAD" { arguments = ["-sS", "-I", "--max-time", "30"] + curlArguments }
        for header in headers { arguments += ["-H", header] }
        if let body {
            let file = sim.directory.appendingPathComponent("body-\(UUID().uuidString)").path
            guard FileManager.default.createFile(atPath: file, contents: Data(body)) else { throw HarnessError("cannot write \(file)") }
            arguments += ["--data-binary", "@" + file]
        }
        let result = try Harness.run("curl", arguments + [base + path], timeout: 40)
        guard result.status == 0 else { throw HarnessError("curl \(method) \(path) failed (\(result.status)): \(result.stderr)") }
        return Self.parse(result.stdout)
    }

    func get(_ path: String, headers: [String] = []) throws -> HTTPExchange { try request("GET", path, headers: headers) }

    func post(_ path: String, _ json: String, headers: [String] = []) throws -> HTTPExchange {
        try request("POST", path, body: Array(json.utf8), headers: ["Content-Type: application/json"] + headers)
    }

    /// The VBD's backend state as the API reports it.
    func backendState() throws -> String? { try get(Self.vbd).json?["backend_state"] as? String }

    /// Both ends Connected, as the API reports them.
    func isConnected() throws -> Bool {
        let vbd = try get(Self.vbd).json
        return vbd?["backend_state"] as? String == "Connected" && vbd?["frontend_state"] as? String == "Connected"
    }

    func stats() throws -> [String: Int] {
        (try get(Self.vbd + "/stats").json ?? [:]).compactMapValues { $0 as? Int }
    }

    /// Splits curl's `-D -` output: the last header block, then the body.
    private static func parse(_ output: String) -> HTTPExchange {
        var rest = Substring(output)
        var status = 0
        var headers: [String: String] = [:]
        // 100 Continue (and any interim answer) comes first; keep the final one.
        while rest.hasPrefix("HTTP/") {
            guard let end = rest.range(of: "\r\n\r\n") else { break }
            let lines = rest[..<end.lowerBound].components(separatedBy: "\r\n")
            status = Int(lines[0].split(separator: " ")[1]) ?? 0
            headers = [:]
            for line in lines.dropFirst() {
                guard let colon = line.firstIndex(of: ":") else { continue }
                headers[line[..<colon].lowercased()] = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
            }
            rest = rest[end.upperBound...]
        }
        return HTTPExchange(status: status, headers: headers, body: String(rest))
    }

    func stop() {
        if let guest { guest.stop(signal: SIGKILL, grace: 1) }
        #expect(daemon.stop() == 0, "blkback-server did not exit 0 on SIGTERM: \(daemon.output)")
        sim.stop()
    }
}
