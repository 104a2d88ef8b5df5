import AsyncHTTPClient
import Foundation
import HTTPTypes
import OpenAPIAsyncHTTPClient
import OpenAPIRuntime

/// The generated `Client` (openapi.yaml) set up for blkback-server: its base URL, the bearer
/// token on every request, and event times with milliseconds.
extension Client {
    /// `timeout`: how long one exchange may take; an event stream lasts until it ends, so
    /// give `watch` clients a long one.
    public static func blkback(url: URL, token: String? = nil, timeout: Duration = .seconds(60)) -> Client {
        let seconds = timeout.components.seconds
        let transport = AsyncHTTPClientTransport(configuration: .init(client: blkbackHTTPClient, timeout: .seconds(seconds)))
        return Client(serverURL: url,
                      configuration: Configuration(dateTranscoder: .iso8601WithFractionalSeconds),
                      transport: transport,
                      middlewares: token.map { [BearerTokenMiddleware(token: $0)] } ?? [])
    }
}

/// The HTTP client every `Client.blkback` shares for the process's life (like
/// `HTTPClient.shared`), but whose idle connections are dropped after 4 s: blkback-server
/// closes a connection idle for 30 s, and a request sent on a connection the server is
/// closing fails (remoteConnectionClosed) instead of being answered.
let blkbackHTTPClient: HTTPClient = {
    var configuration = HTTPClient.Configuration()
    configuration.connectionPool.idleTimeout = .seconds(4)
    return HTTPClient(eventLoopGroupProvider: .singleton, configuration: configuration)
}()

/// `Authorization: Bearer <token>` on every request.
struct BearerTokenMiddleware: ClientMiddleware {
    let token: String

    func intercept(_ request: HTTPRequest, body: HTTPBody?, baseURL: URL, operationID: String,
                   next: (HTTPRequest, HTTPBody?, URL) async throws -> (HTTPResponse, HTTPBody?)) async throws -> (HTTPResponse, HTTPBody?) {
        var request = request
        request.headerFields[.authorization] = "Bearer \(token)"
        return try await next(request, body, baseURL)
    }
}

/// One item of GET /v1/events.
public enum VBDStreamItem: Sendable {
    /// An event of a VBD, with its id.
    case event(Components.Schemas.Event)
    /// The events the client missed on reconnecting are gone (the JSON `data:` says which).
    case eventsLost(String)
    /// The stream fell too far behind and the daemon ended it (the JSON `data:` says why).
    case cutOff(String)
}

extension HTTPBody {
    /// The event stream's items, decoded; heartbeats and the prelude are skipped.
    public func vbdStreamItems() -> some AsyncSequence<VBDStreamItem, any Error> {
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .custom { decoder in
            let text = try decoder.singleValueContainer().decode(String.self)
            guard let date = ISO8601DateFormatter.withMilliseconds.date(from: text) else {
                throw DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath, debugDescription: "not an RFC 3339 time: \(text)"))
            }
            return date
        }
        return asDecodedServerSentEvents().compactMap { sse -> VBDStreamItem? in
            guard let name = sse.event, let data = sse.data else { return nil }
            switch name {
            case "events-lost": return .eventsLost(data)
            case "cut-off": return .cutOff(data)
            default: return .event(try decoder.decode(Components.Schemas.Event.self, from: Data(data.utf8)))
            }
        }
    }
}

extension ISO8601DateFormatter {
    nonisolated(unsafe) static let withMilliseconds: ISO8601DateFormatter = {
        let formatter = ISO8601DateFormatter()
        formatter.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        return formatter
    }()
}
