// A hostile API client: the input is one request (method, path, query, headers, body, split
// at NUL bytes) handed to the REST API's router and body parsers, over an engine that serves
// no VBD and refuses every command. Every answer must be a well-formed status, a JSON answer
// must parse, and nothing but /healthz may answer without the token. The body is also parsed
// as JSON alone: what parses must serialize and parse back to the same value.
import API
import Engine
import FuzzSupport

/// No VBDs; commands fail the three ways the control plane can answer (by devid).
private final class RefusingBackend: ManagedBackend {
    let isWatching = true
    let events = VBDEventLog(historyCapacity: 16)
    func snapshots() -> [VBDSnapshot] { [] }
    func submit(_ command: VBDCommand, on selector: VBDSelector, timeout: Double,
                answer: @escaping @Sendable (Result<VBDSnapshot, VBDCommandError>) -> Void) {
        switch selector.devid % 3 {
        case 0: answer(.failure(.unknownDevice))
        case 1: answer(.failure(.conflict("refused")))
        default: answer(.failure(.unavailable("busy")))
        }
    }
}

private let token = "fuzz-token-0123456789abcdef"
private let api = ManagementAPI(backend: RefusingBackend(), token: BearerToken(token))
private let methods = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "get", ""]

private func text(_ bytes: some Collection<UInt8>) -> String { String(decoding: bytes, as: UTF8.self) }

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzManagementAPI(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    guard let data else { return 0 }
    let bytes = UnsafeBufferPointer(start: data, count: size)
    guard let first = bytes.first else { return 0 }
    let parts = bytes.dropFirst().split(separator: 0, maxSplits: 3, omittingEmptySubsequences: false)
    func part(_ index: Int) -> ArraySlice<UInt8> { index < parts.count ? ArraySlice(parts[index]) : [] }

    var query: [String: String] = [:]
    for pair in part(1).split(separator: UInt8(ascii: "&")) {
        let nameValue = pair.split(separator: UInt8(ascii: "="), maxSplits: 1, omittingEmptySubsequences: false)
        query[text(nameValue[0])] = nameValue.count > 1 ? text(nameValue[1]) : ""
    }
    var headers: [String: String] = [:]
    for line in part(2).split(separator: UInt8(ascii: "\n")) {
        let nameValue = line.split(separator: UInt8(ascii: ":"), maxSplits: 1, omittingEmptySubsequences: false)
        headers[text(nameValue[0]).lowercased()] = nameValue.count > 1 ? text(nameValue[1]) : ""
    }
    let authorized = first & 0x80 != 0
    if authorized { headers["authorization"] = "Bearer \(token)" }
    let request = HTTPRequest(method: methods[Int(first & 0x7f) % methods.count], path: text(part(0)),
                              query: query, headers: headers, body: Array(part(3)))

    let answer = api.respond(request)
    // This backend answers while it is asked, so a deferred answer is there at once.
    check(answer.deferred == nil || answer.deferred?.completed != nil, "a deferred answer that never came")
    let response = answer.deferred?.completed ?? answer
    check((200...599).contains(response.status), "status \(response.status)")
    if !authorized && headers["authorization"] != "Bearer \(token)" && request.path != "/healthz" {
        check(response.status == 401, "\(request.method) \(request.path) answered \(response.status) without the token")
    }
    if let stream = response.stream {
        stream.attach(wake: {})
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 1)
        _ = stream.read(into: buffer)
        buffer.deallocate()
        stream.close()
    } else if response.headers.contains(where: { $0 == ("Content-Type", "application/json") }) {
        check((try? JSONValue.parse(response.body)) != nil, "a JSON answer that does not parse: \(text(response.body))")
    }

    if let value = try? JSONValue.parse(Array(part(3))) {
        for pretty in [false, true] {
            let again = try? JSONValue.parse(Array(value.serialized(pretty: pretty).utf8))
            check(again == value, "\(value) serialized and parsed back as \(String(describing: again))")
        }
    }
    return 0
}

@_cdecl("FuzzManagementAPI_main")
public func main(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> CInt {
    runLibFuzzer(argc, argv, fuzzManagementAPI)
}
