import ArgumentParser
import BlkbackClient
import Foundation
import OpenAPIRuntime

/// The operator's CLI over the generated client: tables by default, `--json` for scripts,
/// an exit code per kind of failure (as tap-ctl and xl do).
@main
struct BlkbackCtl: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "blkbackctl",
        abstract: "Look at and steer the VBDs a blkback-server serves, through its HTTP API.",
        discussion: """
            The daemon is found at --url (or $BLKBACK_URL, default http://127.0.0.1:8080); a \
            token is read from --token-file (or $BLKBACK_TOKEN_FILE).

            EXIT CODES
              0  done
              1  the daemon refused the request (a bad value, or not allowed now: 400, 409)
              3  no such VBD (404)
              4  a token is needed or wrong (401)
              5  the daemon cannot be reached
              6  the daemon is busy (503): try again
             64  bad command line
            """,
        subcommands: [List.self, Show.self, Stats.self, Close.self, Reconnect.self, QoS.self, Resize.self, Watch.self])
}

// MARK: - options and failures

struct Connection: ParsableArguments {
    @Option(help: ArgumentHelp("The daemon's API (default $BLKBACK_URL or http://127.0.0.1:8080).", valueName: "url"))
    var url: String?

    @Option(help: ArgumentHelp("File holding the bearer token (default $BLKBACK_TOKEN_FILE).", valueName: "file"))
    var tokenFile: String?

    @Flag(help: "Print JSON (one object, or one per line for watch) instead of a table.")
    var json = false

    func client(timeout: Duration = .seconds(30)) throws -> Client {
        let text = url ?? ProcessInfo.processInfo.environment["BLKBACK_URL"] ?? "http://127.0.0.1:8080"
        guard let base = URL(string: text), base.scheme == "http" || base.scheme == "https", base.host != nil else {
            throw ValidationError("--url '\(text)' is not an http(s) URL")
        }
        var token: String?
        if let file = tokenFile ?? ProcessInfo.processInfo.environment["BLKBACK_TOKEN_FILE"] {
            guard let read = try? String(contentsOfFile: file, encoding: .utf8) else {
                throw Failure(.usage, "cannot read the token file \(file)")
            }
            token = read.trimmingCharacters(in: .whitespacesAndNewlines)
        }
        return Client.blkback(url: base, token: token, timeout: timeout)
    }
}

struct VBDAddress: ParsableArguments {
    @Argument(help: "The frontend's domain id.")
    var domid: Int
    @Argument(help: "The virtual device number (51712 = xvda).")
    var devid: Int

    func validate() throws {
        guard (0...32751).contains(domid) else { throw ValidationError("domid must be 0...32751, got \(domid)") }
        guard (0...Int(UInt32.max)).contains(devid) else { throw ValidationError("devid must be 0...4294967295, got \(devid)") }
    }

    var path: (domid: Int, devid: Int) { (domid, devid) }
}

/// One line on stderr and an exit code that says what failed.
struct Failure: Error, CustomStringConvertible {
    enum Kind: Int32 { case refused = 1, notFound = 3, unauthorized = 4, unreachable = 5, busy = 6, usage = 64 }
    let kind: Kind
    let description: String
    init(_ kind: Kind, _ description: String) {
        self.kind = kind
        self.description = description
    }

    /// From an answer the spec does not list for this operation.
    static func undocumented(_ status: Int) -> Failure {
        Failure(status == 503 ? .busy : .refused, "the daemon answered HTTP \(status)")
    }
}

/// Runs one request: failures print one line and exit with their code.
func perform(_ body: () async throws -> Void) async throws {
    do {
        try await body()
    } catch let failure as Failure {
        FileHandle.standardError.write(Data("blkbackctl: \(failure.description)\n".utf8))
        throw ExitCode(failure.kind.rawValue)
    } catch let error as ClientError {
        FileHandle.standardError.write(Data("blkbackctl: cannot reach the daemon (\(error.underlyingError)); is blkback-server running? (--url)\n".utf8))
        throw ExitCode(Failure.Kind.unreachable.rawValue)
    }
}

func printJSON(_ value: some Encodable) throws {
    emit(try jsonLine(value))
}

func jsonLine(_ value: some Encodable) throws -> String {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
    encoder.dateEncodingStrategy = .iso8601
    return String(decoding: try encoder.encode(value), as: UTF8.self)
}

/// One line on stdout, written at once (a watch piped into a script is read as it comes).
func emit(_ line: String) {
    FileHandle.standardOutput.write(Data((line + "\n").utf8))
}

/// Columns padded to their widest cell.
func printTable(_ header: [String], _ rows: [[String]]) {
    let widths = header.indices.map { column in ([header] + rows).map { $0[column].count }.max() ?? 0 }
    for row in [header] + rows {
        emit(zip(row, widths).map { $0.padding(toLength: $1, withPad: " ", startingAt: 0) }.joined(separator: "  ")
            .trimmingCharacters(in: .whitespaces))
    }
}

// MARK: - reading

struct List: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "List the VBDs (like xl block-list, for every domain).")
    @OptionGroup var connection: Connection
    @Option(help: "Only this backend kind (vbd, vbd3, ...).") var kind: String?

    func run() async throws {
        try await perform {
            switch try await connection.client().listVBDs(query: .init(kind: kind)) {
            case .ok(let ok):
                let vbds = try ok.body.json.vbds
                if connection.json { return try printJSON(vbds) }
                printTable(["DOMID", "DEVID", "KIND", "BACKEND", "FRONTEND", "MODE", "SIZE", "IO", "TARGET"], vbds.map { vbd in
                    ["\(vbd.domid)", "\(vbd.devid)", vbd.kind, vbd.backendState.rawValue, vbd.frontendState.rawValue,
                     vbd.mode.rawValue, Self.size(vbd.sectors), vbd.ioMode?.rawValue ?? "-", vbd.target]
                })
            case .unauthorized(let answer): throw Failure(.unauthorized, try answer.body.json.error)
            case .undocumented(let status, _): throw Failure.undocumented(status)
            }
        }
    }

    static func size(_ sectors: Int) -> String {
        let bytes = Double(sectors) * 512
        for (unit, scale) in [("T", 1099511627776.0), ("G", 1073741824.0), ("M", 1048576.0), ("K", 1024.0)] where bytes >= scale {
            return String(format: "%.1f%@", bytes / scale, unit)
        }
        return "\(Int(bytes))B"
    }
}

struct Show: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Everything the daemon knows about one VBD.")
    @OptionGroup var connection: Connection
    @OptionGroup var vbd: VBDAddress

    func run() async throws {
        try await perform {
            switch try await connection.client().getVBD(path: .init(domid: vbd.domid, devid: vbd.devid)) {
            case .ok(let ok):
                let v = try ok.body.json
                if connection.json { return try printJSON(v) }
                let features = [("flush", v.features.flush), ("barrier", v.features.barrier), ("discard", v.features.discard)]
                    .filter(\.1).map(\.0).joined(separator: ",")
                let rows: [(String, String)] = [
                    ("vbd", "\(v.kind)/\(v.domid)/\(v.devid)"), ("backend", "\(v.backendPath) (\(v.backendState.rawValue))"),
                    ("frontend", "\(v.frontendPath) (\(v.frontendState.rawValue))"), ("target", v.target), ("mode", v.mode.rawValue),
                    ("size", "\(v.sectors) sectors (\(List.size(v.sectors)))"),
                    ("sector-size", "\(v.sectorSize) logical, \(v.physicalSectorSize) physical"),
                    ("protocol", v._protocol ?? "-"), ("queues", "\(v.queues)"), ("ring-page-order", "\(v.ringPageOrder)"),
                    ("persistent-grants", v.persistentGrants ? "yes" : "no"), ("io-mode", v.ioMode?.rawValue ?? "-"),
                    ("indirect-segments", "\(v.maxIndirectSegments)"), ("features", features.isEmpty ? "-" : features),
                ] + (v.error.map { [("error", $0)] } ?? [])
                for (name, value) in rows { emit("\(name.padding(toLength: 18, withPad: " ", startingAt: 0))\(value)") }
            case .badRequest(let answer): throw Failure(.refused, try answer.body.json.error)
            case .unauthorized(let answer): throw Failure(.unauthorized, try answer.body.json.error)
            case .notFound(let answer): throw Failure(.notFound, try answer.body.json.error)
            case .undocumented(let status, _): throw Failure.undocumented(status)
            }
        }
    }
}

struct Stats: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "A VBD's data-path counters since it connected.")
    @OptionGroup var connection: Connection
    @OptionGroup var vbd: VBDAddress

    func run() async throws {
        try await perform {
            switch try await connection.client().getVBDStats(path: .init(domid: vbd.domid, devid: vbd.devid)) {
            case .ok(let ok):
                let s = try ok.body.json
                if connection.json { return try printJSON(s) }
                printTable(["RD_REQ", "WR_REQ", "F_REQ", "DS_REQ", "OO_REQ", "RD_SECT", "WR_SECT", "ERRORS", "INFLIGHT", "PGRANTS"],
                           [[s.rdReq, s.wrReq, s.fReq, s.dsReq, s.ooReq, s.rdSect, s.wrSect, s.errors, s.inflight, s.persistentGrants].map { "\($0)" }])
            case .badRequest(let answer): throw Failure(.refused, try answer.body.json.error)
            case .unauthorized(let answer): throw Failure(.unauthorized, try answer.body.json.error)
            case .notFound(let answer): throw Failure(.notFound, try answer.body.json.error)
            case .undocumented(let status, _): throw Failure.undocumented(status)
            }
        }
    }
}

// MARK: - commands

/// POST …/state, answered with the VBD.
func changeState(_ connection: Connection, _ vbd: VBDAddress, _ state: Components.Schemas.StateCommand.StatePayload) async throws {
    try await perform {
        switch try await connection.client().setVBDState(path: .init(domid: vbd.domid, devid: vbd.devid), body: .json(.init(state: state))) {
        case .accepted(let answer):
            let v = try answer.body.json
            if connection.json { return try printJSON(v) }
            emit("\(v.kind)/\(v.domid)/\(v.devid): backend \(v.backendState.rawValue), frontend \(v.frontendState.rawValue)")
        case .badRequest(let answer): throw Failure(.refused, try answer.body.json.error)
        case .unauthorized(let answer): throw Failure(.unauthorized, try answer.body.json.error)
        case .notFound(let answer): throw Failure(.notFound, try answer.body.json.error)
        case .conflict(let answer): throw Failure(.refused, try answer.body.json.error)
        case .contentTooLarge(let answer): throw Failure(.refused, try answer.body.json.error)
        case .serviceUnavailable(let answer): throw Failure(.busy, try answer.body.json.error)
        case .undocumented(let status, _): throw Failure.undocumented(status)
        }
    }
}

struct Close: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Close a VBD: Closing (the frontend closes, the guest loses the disk), or Closed at once with --force.")
    @OptionGroup var connection: Connection
    @OptionGroup var vbd: VBDAddress
    @Flag(help: "Write Closed without waiting for the frontend.") var force = false

    func run() async throws { try await changeState(connection, vbd, force ? .closed : .closing) }
}

struct Reconnect: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Offer a closed VBD again (InitWait); the frontend connects anew.")
    @OptionGroup var connection: Connection
    @OptionGroup var vbd: VBDAddress

    func run() async throws { try await changeState(connection, vbd, .reconnect) }
}

struct Resize: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Read the backing store's size again and tell the frontend.")
    @OptionGroup var connection: Connection
    @OptionGroup var vbd: VBDAddress

    func run() async throws {
        try await perform {
            switch try await connection.client().resizeVBD(path: .init(domid: vbd.domid, devid: vbd.devid)) {
            case .accepted(let answer):
                let v = try answer.body.json
                if connection.json { return try printJSON(v) }
                emit("\(v.kind)/\(v.domid)/\(v.devid): \(v.sectors) sectors (\(List.size(v.sectors)))")
            case .badRequest(let answer): throw Failure(.refused, try answer.body.json.error)
            case .unauthorized(let answer): throw Failure(.unauthorized, try answer.body.json.error)
            case .notFound(let answer): throw Failure(.notFound, try answer.body.json.error)
            case .conflict(let answer): throw Failure(.refused, try answer.body.json.error)
            case .contentTooLarge(let answer): throw Failure(.refused, try answer.body.json.error)
            case .serviceUnavailable(let answer): throw Failure(.busy, try answer.body.json.error)
            case .undocumented(let status, _): throw Failure.undocumented(status)
            }
        }
    }
}

struct QoS: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "qos",
        abstract: "Show a VBD's QoS limits, or replace them (limits not given are lifted; 0 = no limit).")
    @OptionGroup var connection: Connection
    @OptionGroup var vbd: VBDAddress
    @Option var totalIops: Int?
    @Option var readIops: Int?
    @Option var writeIops: Int?
    @Option var totalBytesPerSecond: Int?
    @Option var readBytesPerSecond: Int?
    @Option var writeBytesPerSecond: Int?
    @Option var burstSeconds: Int?

    var limits: Components.Schemas.QoS? {
        let values = [totalIops, readIops, writeIops, totalBytesPerSecond, readBytesPerSecond, writeBytesPerSecond, burstSeconds]
        guard values.contains(where: { $0 != nil }) else { return nil }
        return .init(totalIops: totalIops, readIops: readIops, writeIops: writeIops, totalBytesPerSecond: totalBytesPerSecond,
                     readBytesPerSecond: readBytesPerSecond, writeBytesPerSecond: writeBytesPerSecond, burstSeconds: burstSeconds)
    }

    func run() async throws {
        try await perform {
            let client = try connection.client()
            let path = (domid: vbd.domid, devid: vbd.devid)
            let shown: Components.Schemas.QoS
            if let limits {
                switch try await client.setVBDQoS(path: .init(domid: path.domid, devid: path.devid), body: .json(limits)) {
                case .ok(let ok): shown = try ok.body.json
                case .badRequest(let answer): throw Failure(.refused, try answer.body.json.error)
                case .unauthorized(let answer): throw Failure(.unauthorized, try answer.body.json.error)
                case .notFound(let answer): throw Failure(.notFound, try answer.body.json.error)
                case .conflict(let answer): throw Failure(.refused, try answer.body.json.error)
                case .contentTooLarge(let answer): throw Failure(.refused, try answer.body.json.error)
                case .serviceUnavailable(let answer): throw Failure(.busy, try answer.body.json.error)
                case .undocumented(let status, _): throw Failure.undocumented(status)
                }
            } else {
                switch try await client.getVBDQoS(path: .init(domid: path.domid, devid: path.devid)) {
                case .ok(let ok): shown = try ok.body.json
                case .badRequest(let answer): throw Failure(.refused, try answer.body.json.error)
                case .unauthorized(let answer): throw Failure(.unauthorized, try answer.body.json.error)
                case .notFound(let answer): throw Failure(.notFound, try answer.body.json.error)
                case .undocumented(let status, _): throw Failure.undocumented(status)
                }
            }
            if connection.json { return try printJSON(shown) }
            printTable(["TOTAL_IOPS", "READ_IOPS", "WRITE_IOPS", "TOTAL_BPS", "READ_BPS", "WRITE_BPS", "BURST_S"],
                       [[shown.totalIops, shown.readIops, shown.writeIops, shown.totalBytesPerSecond, shown.readBytesPerSecond,
                         shown.writeBytesPerSecond, shown.burstSeconds].map { ($0 ?? 0) == 0 ? "-" : "\($0!)" }])
        }
    }
}

// MARK: - the event stream

struct Watch: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Print what happens to the VBDs as it happens (GET /v1/events), until interrupted.")
    @OptionGroup var connection: Connection
    @Option(help: "Only this frontend domain.") var domid: Int?
    @Option(help: "Only this backend kind.") var kind: String?
    @Option(help: "Resume after this event id (what a previous watch printed last).") var lastEventId: Int?
    @Option(help: "Stop after this many events (default: never).") var count: Int?

    func run() async throws {
        try await perform {
            // The stream lasts as long as the daemon: no deadline on the exchange.
            let client = try connection.client(timeout: .seconds(10 * 365 * 86400))
            let answer = try await client.watchEvents(query: .init(domid: domid, kind: kind),
                                                      headers: .init(lastEventID: lastEventId))
            let body: HTTPBody
            switch answer {
            case .ok(let ok): body = try ok.body.textEventStream
            case .badRequest(let answer): throw Failure(.refused, try answer.body.json.error)
            case .unauthorized(let answer): throw Failure(.unauthorized, try answer.body.json.error)
            case .serviceUnavailable(let answer): throw Failure(.busy, try answer.body.json.error)
            case .undocumented(let status, _): throw Failure.undocumented(status)
            }
            var printed = 0
            for try await item in body.vbdStreamItems() {
                switch item {
                case .event(let event):
                    emit(connection.json ? try jsonLine(event) : Self.line(event))
                    printed += 1
                case .eventsLost(let data):
                    FileHandle.standardError.write(Data("blkbackctl: events were lost while away: \(data)\n".utf8))
                case .cutOff(let data):
                    throw Failure(.refused, "the daemon cut this stream off: \(data)")
                }
                if let count, printed >= count { return }
            }
            throw Failure(.unreachable, "the daemon ended the event stream (it stopped?)")
        }
    }

    /// One event on one line: id, time, VBD, type, then its details as key=value (the
    /// members the event has, named as in the JSON).
    static func line(_ event: Components.Schemas.Event) -> String {
        let skip: Set<String> = ["id", "_type", "time", "domid", "devid", "kind"]
        let details: [String] = Mirror(reflecting: event).children.compactMap { child in
            guard let label = child.label, !skip.contains(label) else { return nil }
            let present = Mirror(reflecting: child.value)
            guard present.displayStyle != .optional || !present.children.isEmpty else { return nil }
            let value = present.displayStyle == .optional ? present.children.first!.value : child.value
            return "\(snakeCase(label))=\(value)"
        }
        let time = ISO8601DateFormatter.string(from: event.time, timeZone: .gmt, formatOptions: [.withInternetDateTime])
        return "\(event.id)  \(time)  \(event.kind)/\(event.domid)/\(event.devid)  \(event._type.rawValue)  \(details.joined(separator: " "))"
    }

    /// ringPageOrder → ring_page_order; _protocol → protocol (the generator's spellings back to the JSON's).
    static func snakeCase(_ name: String) -> String {
        var out = ""
        for character in name.drop(while: { $0 == "_" }) {
            if character.isUppercase { out += "_" + character.lowercased() } else { out.append(character) }
        }
        return out
    }
}
