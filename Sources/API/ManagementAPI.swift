import Engine
import Foundation

/// What the API needs from the engine: snapshots to read and a command path into the
/// control plane. BackendManager provides it; handlers never touch the data plane.
public protocol ManagedBackend: AnyObject, Sendable {
    var isWatching: Bool { get }
    /// What happens to the VBDs (GET /v1/events).
    var events: VBDEventLog { get }
    func snapshots() -> [VBDSnapshot]
    /// Queues a command; `answer` is called once, from any thread, within `timeout` seconds.
    func submit(_ command: VBDCommand, on selector: VBDSelector, timeout: Double,
                answer: @escaping @Sendable (Result<VBDSnapshot, VBDCommandError>) -> Void)
}

extension BackendManager: ManagedBackend {}

/// The REST API of docs/api.md (described in openapi.yaml) over an engine: routing, bearer-token check, JSON in and out.
public struct ManagementAPI: Sendable {
    /// How long a state command may take on the control-plane thread before the answer is 503.
    static let commandTimeout = 5.0

    private let backend: any ManagedBackend
    private let token: BearerToken?
    public let eventStreams: EventStreams

    public init(backend: any ManagedBackend, token: BearerToken?, events: EventStreams.Configuration = .init()) {
        self.backend = backend
        self.token = token
        eventStreams = EventStreams(log: backend.events, configuration: events)
    }

    private enum Route {
        case health, vbds, metrics, events
        case vbd(domid: String, devid: String)
        case stats(domid: String, devid: String)
        case state(domid: String, devid: String)
        case qos(domid: String, devid: String)
        case resize(domid: String, devid: String)

        init?(path: String) {
            let parts = path.split(separator: "/", omittingEmptySubsequences: false).map(String.init)
            switch parts {
            case ["", "healthz"]: self = .health
            case ["", "metrics"]: self = .metrics
            case ["", "v1", "vbds"]: self = .vbds
            case ["", "v1", "events"]: self = .events
            case let p where p.count == 5 && p[1] == "v1" && p[2] == "vbds" && p[0].isEmpty:
                self = .vbd(domid: p[3], devid: p[4])
            case let p where p.count == 6 && p[1] == "v1" && p[2] == "vbds" && p[0].isEmpty && p[5] == "stats":
                self = .stats(domid: p[3], devid: p[4])
            case let p where p.count == 6 && p[1] == "v1" && p[2] == "vbds" && p[0].isEmpty && p[5] == "state":
                self = .state(domid: p[3], devid: p[4])
            case let p where p.count == 6 && p[1] == "v1" && p[2] == "vbds" && p[0].isEmpty && p[5] == "qos":
                self = .qos(domid: p[3], devid: p[4])
            case let p where p.count == 6 && p[1] == "v1" && p[2] == "vbds" && p[0].isEmpty && p[5] == "resize":
                self = .resize(domid: p[3], devid: p[4])
            default: return nil
            }
        }

        var methods: [String] {
            switch self {
            case .state, .resize: ["POST"]
            case .qos: ["GET", "HEAD", "PUT"]
            case .events: ["GET"]
            default: ["GET", "HEAD"]
            }
        }
    }

    public func respond(_ request: HTTPRequest) -> HTTPResponse {
        let pretty = Self.wantsPretty(request)
        let route = Route(path: request.path)
        if case .health = route {} else if let token, !token.authorizes(request.header("Authorization")) {
            var response = error(401, "missing or wrong bearer token; send Authorization: Bearer <token>", pretty: pretty)
            response.headers.append(("WWW-Authenticate", "Bearer realm=\"blkback\""))
            return response
        }
        guard let route else {
            return error(404, "no such path \(Self.printable(request.path)); see openapi.yaml for the API", pretty: pretty)
        }
        guard route.methods.contains(request.method) else {
            var response = error(405, "method \(Self.printable(request.method)) not allowed on \(Self.printable(request.path)); use \(route.methods.joined(separator: " or "))", pretty: pretty)
            response.headers.append(("Allow", route.methods.joined(separator: ", ")))
            return response
        }
        switch route {
        case .health:
            return backend.isWatching
                ? json(200, .object([("status", .string("ok"))]), pretty: pretty)
                : json(503, .object([("status", .string("starting")), ("error", .string("the engine is not watching xenstore yet"))]), pretty: pretty)
        case .vbds:
            let kind = request.query["kind"]
            let vbds = backend.snapshots().filter { kind == nil || $0.kind == kind }
            return json(200, .object([("vbds", .array(vbds.map(Self.vbdJSON)))]), pretty: pretty)
        case .events:
            return events(request, pretty: pretty)
        case .metrics:
            return HTTPResponse(status: 200, headers: [("Content-Type", MetricsExposition.contentType), ("Cache-Control", "no-store")],
                                body: Array(MetricsExposition.render(backend.snapshots()).utf8))
        case .vbd(let domid, let devid), .stats(let domid, let devid):
            switch lookup(domid, devid, request) {
            case .failure(let response): return response.with(pretty: pretty)
            case .success(let vbd):
                if case .stats = route { return json(200, Self.statsJSON(vbd.statistics ?? VBDStatistics()), pretty: pretty) }
                return json(200, Self.vbdJSON(vbd), pretty: pretty)
            }
        case .state(let domid, let devid):
            return command(domid, devid, request, pretty: pretty, status: 202) { body throws(JSONError) in
                .state(try Self.stateCommand(body))
            } answer: { Self.vbdJSON($0) }
        case .resize(let domid, let devid):
            return command(domid, devid, request, pretty: pretty, status: 202, emptyBodyAllowed: true) { body throws(JSONError) in
                guard body == .object([]) else { throw JSONError("the body of a resize is empty or {}") }
                return .resize
            } answer: { Self.vbdJSON($0) }
        case .qos(let domid, let devid) where request.method == "PUT":
            return command(domid, devid, request, pretty: pretty, status: 200) { body throws(JSONError) in
                .qos(try Self.qosLimits(body))
            } answer: { Self.qosJSON($0.qos) }
        case .qos(let domid, let devid):
            switch lookup(domid, devid, request) {
            case .failure(let response): return response.with(pretty: pretty)
            case .success(let vbd): return json(200, Self.qosJSON(vbd.qos), pretty: pretty)
            }
        }
    }

    // MARK: handlers

    /// GET /v1/events: `?domid=` and `?kind=` filter, `Last-Event-ID` resumes.
    private func events(_ request: HTTPRequest, pretty: Bool) -> HTTPResponse {
        var filter = VBDEventFilter()
        for (name, value) in request.query {
            switch name {
            case "domid":
                guard let domid = DomainID(pathElement: value) else {
                    return error(400, "domid '\(Self.printable(value))' is not a domain number (0 to \(DomainID.largest))", pretty: pretty)
                }
                filter.domid = domid
            case "kind":
                guard !value.isEmpty, value.utf8.count <= 64, value.utf8.allSatisfy({ $0.isASCIILowercaseOrDigit }) else {
                    return error(400, "kind '\(Self.printable(value))' is not a backend kind (vbd, vbd3, qdisk, ...)", pretty: pretty)
                }
                filter.kind = value
            case "pretty":
                continue
            default:
                return error(400, "unknown query argument '\(Self.printable(name))'; /v1/events takes domid and kind", pretty: pretty)
            }
        }
        var lastEventID: UInt64?
        if let header = request.header("Last-Event-ID"), !header.isEmpty {
            guard let id = UInt64(header.trimmingCharacters(in: .whitespaces)) else {
                return error(400, "Last-Event-ID '\(Self.printable(header))' is not an event id (a whole number)", pretty: pretty)
            }
            lastEventID = id
        }
        guard let stream = eventStreams.openStream(filter: filter, lastEventID: lastEventID) else {
            var response = error(503, "\(eventStreams.configuration.maximumStreams) event streams are open already; close one or retry later", pretty: pretty)
            response.headers.append(("Retry-After", "5"))
            return response
        }
        return HTTPResponse(status: 200, headers: [("Content-Type", "text/event-stream"), ("Cache-Control", "no-store"),
                                                   ("X-Accel-Buffering", "no")], stream: stream)
    }

    struct ErrorResponse: Error {
        let status: Int
        let message: String
        func with(pretty: Bool) -> HTTPResponse { ManagementAPI.errorResponse(status, message, pretty: pretty) }
    }

    /// The VBD a path names: its numbers, parsed once, and the optional `kind` query argument.
    static func selector(_ domid: String, _ devid: String, _ request: HTTPRequest) -> Result<VBDSelector, ErrorResponse> {
        guard let domain = DomainID(pathElement: domid) else {
            return .failure(ErrorResponse(status: 400, message: "domid '\(printable(domid))' is not a domain number (0 to \(DomainID.largest))"))
        }
        guard let device = XenbusValue.pathNumber(devid) else {
            return .failure(ErrorResponse(status: 400, message: "devid '\(printable(devid))' is not a device number (0 to 4294967295)"))
        }
        return .success(VBDSelector(domid: domain, devid: device, kind: request.query["kind"]))
    }

    private func lookup(_ domid: String, _ devid: String, _ request: HTTPRequest) -> Result<VBDSnapshot, ErrorResponse> {
        Self.selector(domid, devid, request).flatMap { selector in
            guard let vbd = selector.pick(backend.snapshots(), identity: \.identity) else {
                return .failure(ErrorResponse(status: 404, message: selector.notFound))
            }
            return .success(vbd)
        }
    }

    /// An operator's command: the body parsed by `parse` (400 when it refuses it; an empty
    /// body counts as {} where `emptyBodyAllowed`), carried out
    /// by the control plane, answered with `status` and `answer` of the VBD afterwards.
    private func command(_ domid: String, _ devid: String, _ request: HTTPRequest, pretty: Bool, status: Int,
                         emptyBodyAllowed: Bool = false, parse: (JSONValue) throws(JSONError) -> VBDCommand,
                         answer: @escaping @Sendable (VBDSnapshot) -> JSONValue) -> HTTPResponse {
        let selector: VBDSelector
        switch Self.selector(domid, devid, request) {
        case .failure(let failure): return failure.with(pretty: pretty)
        case .success(let parsed): selector = parsed
        }
        let command: VBDCommand
        do {
            command = try parse(request.body.isEmpty && emptyBodyAllowed ? .object([]) : try JSONValue.parse(request.body))
        } catch {
            return self.error(400, error.description, pretty: pretty)
        }
        // The connection is parked while the control plane works: a slow command holds none
        // of the server's threads, so /healthz and /metrics keep answering.
        let deferred = HTTPDeferredResponse()
        backend.submit(command, on: selector, timeout: Self.commandTimeout) { result in
            switch result {
            case .success(let vbd):
                deferred.complete(Self.jsonResponse(status, answer(vbd), pretty: pretty))
            case .failure(.unknownDevice):
                deferred.complete(Self.errorResponse(404, selector.notFound, pretty: pretty))
            case .failure(.conflict(let reason)):
                deferred.complete(Self.errorResponse(409, reason, pretty: pretty))
            case .failure(.unavailable(let reason)):
                var response = Self.errorResponse(503, reason, pretty: pretty)
                response.headers.append(("Retry-After", "1"))
                deferred.complete(response)
            }
        }
        return .later(deferred)
    }

    /// The body of POST …/state: exactly `{"state": "closing" | "closed" | "reconnect"}`.
    static func stateCommand(_ body: JSONValue) throws(JSONError) -> VBDStateCommand {
        guard case .object(let members) = body else { throw JSONError("the body must be a JSON object, got \(body.typeName)") }
        if let extra = members.first(where: { $0.0 != "state" }) {
            throw JSONError("unknown member '\(printable(extra.0))'; the body is {\"state\": ...}")
        }
        let names = VBDStateCommand.allCases.map(\.rawValue).joined(separator: ", ")
        guard let value = body["state"] else { throw JSONError("missing member 'state' (one of \(names))") }
        guard case .string(let name) = value else { throw JSONError("'state' must be a string (one of \(names)), got \(value.typeName)") }
        guard let command = VBDStateCommand(rawValue: name) else {
            throw JSONError("'state' must be one of \(names), got '\(printable(name))'")
        }
        return command
    }

    /// The body of PUT …/qos: an object of the limits (each a whole number from 0, meaning
    /// no limit, to its largest); absent members are no limit.
    static func qosLimits(_ body: JSONValue) throws(JSONError) -> QoSLimits {
        guard case .object(let members) = body else { throw JSONError("the body must be a JSON object, got \(body.typeName)") }
        let names = QoSLimits.fields.map(\.name)
        var limits = QoSLimits()
        for (name, value) in members {
            guard let field = QoSLimits.fields.first(where: { $0.name == name })?.value else {
                throw JSONError("unknown member '\(printable(name))'; the limits are \(names.joined(separator: ", "))")
            }
            let largest = QoSLimits.largest(name)
            guard case .integer(let number) = value, number >= 0, UInt64(number) <= largest else {
                throw JSONError("'\(name)' must be a whole number from 0 (no limit) to \(largest), got \(printable(value.serialized()))")
            }
            limits[keyPath: field] = UInt64(number)
        }
        return limits
    }

    static func qosJSON(_ limits: QoSLimits) -> JSONValue {
        .object(QoSLimits.fields.map { ($0.name, .integer(Int64(limits[keyPath: $0.value]))) })
    }

    // MARK: JSON documents

    static func vbdJSON(_ vbd: VBDSnapshot) -> JSONValue {
        var members: [(String, JSONValue)] = [
            ("domid", .integer(Int64(vbd.domid))),
            ("devid", .integer(Int64(vbd.devid))),
            ("kind", .string(vbd.kind)),
            ("backend_path", .string(vbd.backendPath)),
            ("frontend_path", .string(vbd.frontendPath)),
            ("backend_state", .string(vbd.backendState.description)),
            ("frontend_state", .string((vbd.frontendState ?? .unknown).description)),
            ("mode", .string(vbd.mode)),
            ("target", .string(vbd.target)),
            ("sectors", .integer(Int64(clamping: vbd.sectors))),
            ("sector_size", .integer(Int64(vbd.sectorSize))),
            ("physical_sector_size", .integer(Int64(vbd.physicalSectorSize))),
            ("protocol", vbd.protocol.map(JSONValue.string) ?? .null),
            ("queues", .integer(Int64(vbd.queues))),
            ("ring_page_order", .integer(Int64(vbd.ringPageOrder))),
            ("persistent_grants", .bool(vbd.persistentGrants)),
            ("io_mode", vbd.ioMode.map { .string($0.rawValue) } ?? .null),
            ("max_indirect_segments", .integer(Int64(vbd.maxIndirectSegments))),
            ("features", .object([("flush", .bool(vbd.features.flush)), ("barrier", .bool(vbd.features.barrier)),
                                  ("discard", .bool(vbd.features.discard))])),
        ]
        if let error = vbd.error { members.append(("error", .string(error))) }
        return .object(members)
    }

    static func statsJSON(_ statistics: VBDStatistics) -> JSONValue {
        let counters: [(String, UInt64)] = [
            ("rd_req", statistics.readRequests), ("wr_req", statistics.writeRequests),
            ("f_req", statistics.flushRequests), ("ds_req", statistics.discardRequests),
            ("oo_req", statistics.outOfResources), ("rd_sect", statistics.readSectors),
            ("wr_sect", statistics.writeSectors), ("errors", statistics.errors), ("inflight", statistics.inflight),
            ("persistent_grants", statistics.persistentGrants), ("halted_rings", statistics.haltedRings),
            ("spurious_events", statistics.spuriousEvents), ("grant_cap_copied", statistics.grantCapCopiedPages),
            ("qos_delayed", statistics.delayedRequests), ("qos_throttled_ms", statistics.throttledNanoseconds / 1_000_000),
            ("store_waiting_rings", statistics.storeWaitingRings), ("store_reconnects", statistics.storeReconnects),
        ]
        return .object(counters.map { ($0.0, .integer(Int64(clamping: $0.1))) })
    }

    // MARK: responses

    private func json(_ status: Int, _ value: JSONValue, pretty: Bool) -> HTTPResponse {
        Self.jsonResponse(status, value, pretty: pretty)
    }

    private func error(_ status: Int, _ message: String, pretty: Bool) -> HTTPResponse {
        Self.errorResponse(status, message, pretty: pretty)
    }

    static func jsonResponse(_ status: Int, _ value: JSONValue, pretty: Bool) -> HTTPResponse {
        HTTPResponse(status: status, headers: [("Content-Type", "application/json"), ("Cache-Control", "no-store")],
                     body: Array((value.serialized(pretty: pretty) + "\n").utf8))
    }

    /// `{"error": "<one line>"}`.
    public static func errorResponse(_ status: Int, _ message: String, pretty: Bool = false) -> HTTPResponse {
        jsonResponse(status, .object([("error", .string(message))]), pretty: pretty)
    }

    // MARK: helpers

    /// Client-supplied text echoed in an error: one line, bounded, no control characters.
    static func printable(_ text: String) -> String {
        let cleaned = String(String.UnicodeScalarView(text.unicodeScalars.prefix(64).map { $0.properties.generalCategory == .control ? "?" : $0 }))
        return text.unicodeScalars.count > 64 ? cleaned + "…" : cleaned
    }

    /// `?pretty` (unless `pretty=0|false`), or an Accept header that ranks text above JSON.
    static func wantsPretty(_ request: HTTPRequest) -> Bool {
        if let value = request.query["pretty"] { return value != "0" && value.lowercased() != "false" }
        guard let accept = request.header("Accept") else { return false }
        var jsonQuality = 0.0, textQuality = 0.0
        for range in accept.split(separator: ",") {
            let parameters = range.split(separator: ";").map { $0.trimmingCharacters(in: .whitespaces).lowercased() }
            guard let type = parameters.first else { continue }
            let quality = parameters.dropFirst().first { $0.hasPrefix("q=") }.flatMap { Double($0.dropFirst(2)) } ?? 1
            switch type {
            case "application/json", "application/*": jsonQuality = max(jsonQuality, quality)
            case "text/plain", "text/*": textQuality = max(textQuality, quality)
            case "*/*":
                jsonQuality = max(jsonQuality, quality)
            default: break
            }
        }
        return textQuality > jsonQuality
    }
}

private extension UInt8 {
    var isASCIILowercaseOrDigit: Bool { (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(self) || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(self) }
}
