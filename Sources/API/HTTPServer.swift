import CMicroHTTPD
import Engine
import Foundation
import Glibc
import Logging

/// One HTTP request as the API sees it: the body is complete and within the size limit.
public struct HTTPRequest: Sendable {
    public var method: String
    /// The path, percent-decoded, without the query.
    public var path: String
    /// Query arguments; a key given without `=value` maps to "".
    public var query: [String: String]
    /// Header names in lower case.
    public var headers: [String: String]
    public var body: [UInt8]

    public init(method: String, path: String, query: [String: String] = [:], headers: [String: String] = [:], body: [UInt8] = []) {
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
    }

    public func header(_ name: String) -> String? { headers[name.lowercased()] }
}

public struct HTTPResponse: Sendable {
    public var status: Int
    public var headers: [(String, String)]
    public var body: [UInt8]
    /// A body produced while it is sent (instead of `body`), until the stream ends.
    public var stream: (any HTTPBodyStream)?
    /// Set by `later`: the answer is still being worked out and comes through this.
    public private(set) var deferred: HTTPDeferredResponse?

    public init(status: Int, headers: [(String, String)] = [], body: [UInt8] = [], stream: (any HTTPBodyStream)? = nil) {
        self.status = status
        self.headers = headers
        self.body = body
        self.stream = stream
    }

    /// An answer that `deferred` will carry: the server parks the connection meanwhile.
    public static func later(_ deferred: HTTPDeferredResponse) -> HTTPResponse {
        var response = HTTPResponse(status: 0)
        response.deferred = deferred
        return response
    }
}

/// An answer worked out on another thread (a command queued for the control plane). The
/// server suspends the connection, so a request waiting for it holds none of the server's
/// few threads, and resumes it when `complete` is called.
public final class HTTPDeferredResponse: @unchecked Sendable {
    private let lock = NSLock()
    private var response: HTTPResponse?
    private var resume: (() -> Void)?

    public init() {}

    /// The first answer wins; later ones are dropped.
    public func complete(_ response: HTTPResponse) {
        let resume: (() -> Void)? = lock.withLock {
            guard self.response == nil else { return nil }
            self.response = response
            defer { self.resume = nil }
            return self.resume
        }
        resume?()
    }

    /// The answer, once there is one.
    public var completed: HTTPResponse? { lock.withLock { response } }

    /// The answer if there is one; otherwise `park` runs and `resume` is kept for `complete`,
    /// both under the lock, so an answer arriving in between is never lost.
    fileprivate func answerOrPark(_ park: () -> Void, resume: @escaping () -> Void) -> HTTPResponse? {
        lock.withLock {
            if let response { return response }
            park()
            self.resume = resume
            return nil
        }
    }
}

/// What a streamed body says when the server asks for more.
public enum HTTPStreamRead: Sendable, Equatable {
    /// This many bytes were written into the buffer.
    case bytes(Int)
    /// Nothing now: the connection is parked (it holds no thread) until `wake` is called.
    case wait
    /// The body is complete.
    case end
}

/// A response body written while it is sent (Server-Sent Events). The server calls `read`
/// from one of its threads whenever the socket has room; after `.wait` it calls `read` again
/// only once the stream calls the `wake` it was attached with.
public protocol HTTPBodyStream: AnyObject, Sendable {
    /// Called once, before the first `read`.
    func attach(wake: @escaping @Sendable () -> Void)
    func read(into buffer: UnsafeMutableRawBufferPointer) -> HTTPStreamRead
    /// The connection is gone (the client left, the stream ended or the server stops).
    func close()
}

public struct HTTPServerError: Error, CustomStringConvertible, Sendable {
    public var description: String
}

/// An embedded HTTP server on libmicrohttpd: a pool of threads each running its own epoll
/// loop, bounded connections, idle timeouts and capped request bodies. Handlers run on the
/// pool's threads and must not block for long. A streamed body with nothing to send parks
/// its connection (MHD_suspend_connection) instead of holding a thread.
public final class HTTPServer: @unchecked Sendable {
    public struct Configuration: Sendable {
        public var address: ListenAddress
        /// PEM certificate chain and private key; nil = plain HTTP.
        public var tls: (certificate: String, key: String)?
        public var threads = 4
        public var connectionLimit = 64
        public var connectionsPerClient = 32
        /// Seconds a connection may stay idle.
        public var connectionTimeout = 30
        /// Largest request body accepted; a larger one gets 413 and is never buffered.
        public var maximumBodySize = 64 * 1024

        public init(address: ListenAddress, tls: (certificate: String, key: String)? = nil) {
            self.address = address
            self.tls = tls
        }
    }

    public typealias Handler = @Sendable (HTTPRequest) -> HTTPResponse

    public let configuration: Configuration
    private let handler: Handler
    /// The server's own answers (a body over the limit, a deferred answer cut short by a
    /// stop) in the handler's format: status and one line.
    private let errorResponse: @Sendable (Int, String) -> HTTPResponse
    private let logger: Logger
    private var daemon: OpaquePointer?
    private let lock = NSLock()
    /// Requests between their first byte and their completion.
    private var activeRequests = 0
    /// Streamed bodies being sent, ended first when the server stops.
    private var streams: [ObjectIdentifier: StreamedBody] = [:]
    /// Parked requests waiting for their answer, answered 503 when the server stops.
    private var parked: [ObjectIdentifier: HTTPDeferredResponse] = [:]
    /// PEM texts stay allocated while the daemon runs.
    private var pem: [UnsafeMutablePointer<CChar>] = []

    public init(configuration: Configuration, logger: Logger,
                errorResponse: @escaping @Sendable (Int, String) -> HTTPResponse, handler: @escaping Handler) {
        self.configuration = configuration
        self.logger = logger
        self.errorResponse = errorResponse
        self.handler = handler
    }

    deinit { stop() }

    /// The GnuTLS priority string of the HTTPS listener: TLS 1.2 and 1.3 only.
    static let tlsPriorities = "NORMAL:-VERS-ALL:+VERS-TLS1.3:+VERS-TLS1.2"

    /// True when this libmicrohttpd was built with HTTPS (GnuTLS) support.
    public static var supportsTLS: Bool { MHD_is_feature_supported(.FEATURE_TLS) == .YES }

    public func start() throws(HTTPServerError) {
        var flags = MHD_USE_INTERNAL_POLLING_THREAD.rawValue | MHD_USE_EPOLL.rawValue | MHD_USE_ITC.rawValue
            | MHD_USE_ERROR_LOG.rawValue | MHD_ALLOW_SUSPEND_RESUME.rawValue
        if configuration.address.isIPv6 { flags |= MHD_USE_IPv6.rawValue }
        // No LISTENING_ADDRESS_REUSE: on Linux that is SO_REUSEPORT, and a second daemon
        // would share the port instead of being told it is taken.
        var options: [MHD_OptionItem] = [
            MHD_OptionItem(option: .THREAD_POOL_SIZE, value: configuration.threads, ptr_value: nil),
            MHD_OptionItem(option: .CONNECTION_LIMIT, value: configuration.connectionLimit, ptr_value: nil),
            MHD_OptionItem(option: .PER_IP_CONNECTION_LIMIT, value: configuration.connectionsPerClient, ptr_value: nil),
            MHD_OptionItem(option: .CONNECTION_TIMEOUT, value: configuration.connectionTimeout, ptr_value: nil),
        ]
        if let tls = configuration.tls {
            flags |= MHD_USE_TLS.rawValue
            options += try tlsOptions(tls)
        }
        let address = configuration.address
        var storage = sockaddr_storage()
        withUnsafeMutableBytes(of: &storage) { raw in
            if address.isIPv6 {
                let v6 = raw.baseAddress!.assumingMemoryBound(to: sockaddr_in6.self)
                v6.pointee.sin6_family = sa_family_t(AF_INET6)
                v6.pointee.sin6_port = address.port.bigEndian
                _ = inet_pton(AF_INET6, address.host, &v6.pointee.sin6_addr)
            } else {
                let v4 = raw.baseAddress!.assumingMemoryBound(to: sockaddr_in.self)
                v4.pointee.sin_family = sa_family_t(AF_INET)
                v4.pointee.sin_port = address.port.bigEndian
                _ = inet_pton(AF_INET, address.host, &v4.pointee.sin_addr)
            }
        }
        let context = Unmanaged.passUnretained(self).toOpaque()
        let started: OpaquePointer? = withUnsafeMutablePointer(to: &storage) { socketAddress in
            options.append(MHD_OptionItem(option: .SOCK_ADDR, value: 0, ptr_value: UnsafeMutableRawPointer(socketAddress)))
            options.append(MHD_OptionItem(option: .END, value: 0, ptr_value: nil))
            Glibc.errno = 0
            return blkback_mhd_start(
                flags, address.port,
                { cls, format, arguments in
                    // libmicrohttpd's own diagnostics, as one log line each.
                    guard let cls, let format, let arguments else { return }
                    var line = [CChar](repeating: 0, count: 512)
                    _ = vsnprintf(&line, line.count, format, arguments)
                    let text = String(decoding: line.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
                        .trimmingCharacters(in: .whitespacesAndNewlines)
                    Unmanaged<HTTPServer>.fromOpaque(cls).takeUnretainedValue().logger.debug("libmicrohttpd: \(text)")
                }, context,
                { cls, connection, url, method, _, uploadData, uploadSize, requestContext in
                    guard let cls, let connection, let url, let method, let uploadSize, let requestContext else { return MHD_Result.NO }
                    return Unmanaged<HTTPServer>.fromOpaque(cls).takeUnretainedValue()
                        .access(connection, url: url, method: method, upload: uploadData, size: uploadSize, context: requestContext)
                }, context,
                { cls, _, requestContext, _ in
                    guard let cls, let requestContext, let state = requestContext.pointee else { return }
                    Unmanaged<RequestState>.fromOpaque(state).release()
                    requestContext.pointee = nil
                    let server = Unmanaged<HTTPServer>.fromOpaque(cls).takeUnretainedValue()
                    server.lock.withLock { server.activeRequests -= 1 }
                }, context,
                options)
        }
        guard let started else {
            let reason = Glibc.errno != 0 ? String(cString: strerror(Glibc.errno)) : "libmicrohttpd refused the configuration"
            releasePEM()
            throw HTTPServerError(description: "cannot listen on \(address): \(reason)")
        }
        daemon = started
    }

    /// The certificate, key and GnuTLS priorities (its defaults, but no protocol older than
    /// TLS 1.2), copied into memory that stays allocated while the daemon runs.
    private func tlsOptions(_ tls: (certificate: String, key: String)) throws(HTTPServerError) -> [MHD_OptionItem] {
        guard Self.supportsTLS else {
            throw HTTPServerError(description: "this libmicrohttpd has no TLS support; drop --tls-cert/--tls-key or install a build with GnuTLS")
        }
        let certificate = strdup(tls.certificate)!, key = strdup(tls.key)!, priorities = strdup(Self.tlsPriorities)!
        pem = [certificate, key, priorities]
        return [
            MHD_OptionItem(option: .HTTPS_MEM_CERT, value: 0, ptr_value: UnsafeMutableRawPointer(certificate)),
            MHD_OptionItem(option: .HTTPS_MEM_KEY, value: 0, ptr_value: UnsafeMutableRawPointer(key)),
            MHD_OptionItem(option: .HTTPS_PRIORITIES, value: 0, ptr_value: UnsafeMutableRawPointer(priorities)),
        ]
    }

    /// Stops taking connections, lets requests being handled finish (up to `grace`
    /// seconds), then closes everything.
    public func stop(grace: Double = 2) {
        guard let daemon else { return }
        self.daemon = nil
        let listener = MHD_quiesce_daemon(daemon)
        for stream in lock.withLock({ Array(streams.values) }) { stream.end() }
        for deferred in lock.withLock({ Array(parked.values) }) {
            deferred.complete(errorResponse(503, "the daemon is stopping; retry once it is back"))
        }
        let deadline = Date().addingTimeInterval(grace)
        while lock.withLock({ activeRequests }) > 0, Date() < deadline { usleep(10_000) }
        MHD_stop_daemon(daemon)
        if listener >= 0 { close(listener) }
        releasePEM()
    }

    private func releasePEM() {
        for text in pem {
            memset(text, 0, strlen(text))   // the key should not linger in freed memory
            free(text)
        }
        pem = []
    }

    /// What one request gathered between libmicrohttpd's calls.
    private final class RequestState {
        var body: [UInt8] = []
        var bodyBytes = 0
        /// Set while the answer is worked out elsewhere.
        var deferred: HTTPDeferredResponse?
    }

    /// libmicrohttpd calls this once when the headers are in, once per chunk of body, and
    /// once more at the end of the body; the answer is queued on that last call, or, for a
    /// deferred answer, on the call that follows the connection's resumption.
    private func access(_ connection: OpaquePointer, url: UnsafePointer<CChar>, method: UnsafePointer<CChar>,
                        upload: UnsafePointer<CChar>?, size: UnsafeMutablePointer<Int>,
                        context: UnsafeMutablePointer<UnsafeMutableRawPointer?>) -> MHD_Result {
        guard let stored = context.pointee else {
            let state = RequestState()
            context.pointee = Unmanaged.passRetained(state).toOpaque()
            lock.withLock { activeRequests += 1 }
            // A declared length over the limit is refused before any of the body is read.
            if let declared = Self.value(connection, .HEADER_KIND, "Content-Length").flatMap({ Int($0) }),
               declared > configuration.maximumBodySize {
                return queue(bodyTooLarge, on: connection)
            }
            return .YES
        }
        let state = Unmanaged<RequestState>.fromOpaque(stored).takeUnretainedValue()
        if let deferred = state.deferred {
            guard let response = deferred.completed else { return .YES }
            lock.withLock { _ = parked.removeValue(forKey: ObjectIdentifier(deferred)) }
            return queue(response, on: connection)
        }
        if size.pointee > 0 {
            // Chunked bodies have no declared length: count, keep only what fits.
            state.bodyBytes += size.pointee
            if state.bodyBytes <= configuration.maximumBodySize, let upload {
                state.body.append(contentsOf: UnsafeRawBufferPointer(start: upload, count: size.pointee))
            } else {
                state.body = []
            }
            size.pointee = 0
            return .YES
        }
        if state.bodyBytes > configuration.maximumBodySize {
            return queue(bodyTooLarge, on: connection)
        }
        let request = HTTPRequest(method: String(cString: method), path: String(cString: url),
                                  query: Self.values(connection, .GET_ARGUMENT_KIND, lowercased: false),
                                  headers: Self.values(connection, .HEADER_KIND, lowercased: true), body: state.body)
        let response = handler(request)
        if let deferred = response.deferred { return park(deferred, state, connection) }
        return queue(response, on: connection)
    }

    private var bodyTooLarge: HTTPResponse {
        errorResponse(413, "request body larger than \(configuration.maximumBodySize) bytes")
    }

    /// Suspends the connection until `deferred` is answered (at once if it already is).
    private func park(_ deferred: HTTPDeferredResponse, _ state: RequestState, _ connection: OpaquePointer) -> MHD_Result {
        state.deferred = deferred
        lock.withLock { parked[ObjectIdentifier(deferred)] = deferred }
        let ready = deferred.answerOrPark({ MHD_suspend_connection(connection) },
                                          resume: { MHD_resume_connection(connection) })
        guard let ready else { return .YES }
        lock.withLock { _ = parked.removeValue(forKey: ObjectIdentifier(deferred)) }
        return queue(ready, on: connection)
    }

    private func queue(_ response: HTTPResponse, on connection: OpaquePointer) -> MHD_Result {
        logger.debug("answer \(response.status)")
        if let stream = response.stream { return queue(response, streaming: stream, on: connection) }
        let body = response.body
        guard let answer = body.withUnsafeBytes({ bytes in
            MHD_create_response_from_buffer(bytes.count, UnsafeMutableRawPointer(mutating: bytes.baseAddress), .RESPMEM_MUST_COPY)
        }) else { return .NO }
        defer { MHD_destroy_response(answer) }
        for (name, value) in response.headers { _ = MHD_add_response_header(answer, name, value) }
        return MHD_queue_response(connection, UInt32(response.status), answer)
    }

    /// A body of unknown length (chunked), read from `stream` as the socket takes it.
    private func queue(_ response: HTTPResponse, streaming stream: any HTTPBodyStream, on connection: OpaquePointer) -> MHD_Result {
        // A fixed send buffer: on loopback the kernel would grow it to megabytes per stream,
        // hiding a client that does not read behind memory instead of the stream's own bound.
        let socket = blkback_mhd_connection_socket(connection)
        if socket >= 0 {
            var bytes = Int32(Self.streamSendBuffer)
            setsockopt(socket, SOL_SOCKET, SO_SNDBUF, &bytes, socklen_t(MemoryLayout<Int32>.size))
        }
        let body = StreamedBody(stream: stream, connection: connection)
        stream.attach { [weak body] in body?.wake() }
        lock.withLock { streams[ObjectIdentifier(body)] = body }
        let context = Unmanaged.passRetained(StreamedBodyContext(server: self, body: body)).toOpaque()
        guard let answer = MHD_create_response_from_callback(UInt64.max, 4096, { cls, _, buffer, capacity in
            guard let cls, let buffer else { return -1 }
            let context = Unmanaged<StreamedBodyContext>.fromOpaque(cls).takeUnretainedValue()
            return context.body.read(into: UnsafeMutableRawBufferPointer(start: buffer, count: capacity))
        }, context, { cls in
            // The response is destroyed: the connection is gone.
            guard let cls else { return }
            let context = Unmanaged<StreamedBodyContext>.fromOpaque(cls).takeRetainedValue()
            context.body.closed()
            context.server?.lock.withLock { _ = context.server?.streams.removeValue(forKey: ObjectIdentifier(context.body)) }
        }) else {
            Unmanaged<StreamedBodyContext>.fromOpaque(context).release()
            lock.withLock { _ = streams.removeValue(forKey: ObjectIdentifier(body)) }
            stream.close()
            return .NO
        }
        defer { MHD_destroy_response(answer) }
        for (name, value) in response.headers { _ = MHD_add_response_header(answer, name, value) }
        return MHD_queue_response(connection, UInt32(response.status), answer)
    }

    /// SO_SNDBUF of a streamed body's socket (the kernel doubles it).
    static let streamSendBuffer = 32 * 1024

    private final class StreamedBodyContext {
        weak var server: HTTPServer?
        let body: StreamedBody
        init(server: HTTPServer, body: StreamedBody) {
            self.server = server
            self.body = body
        }
    }

    /// One streamed body and its connection's parking: the connection is suspended when the
    /// stream has nothing, and resumed by the stream's wake — each under one lock, so a
    /// wake-up between the stream's "nothing" and the suspension is never lost.
    private final class StreamedBody: @unchecked Sendable {
        let stream: any HTTPBodyStream
        private let connection: OpaquePointer
        private let lock = NSLock()
        private var suspended = false
        private var wokenWhileReading = false
        private var ended = false
        private var gone = false

        init(stream: any HTTPBodyStream, connection: OpaquePointer) {
            self.stream = stream
            self.connection = connection
        }

        /// libmicrohttpd's content reader: bytes, 0 (parked, or asked again at once after a
        /// wake-up that came while reading), or -1 for the end (MHD_CONTENT_READER_END_OF_STREAM).
        func read(into buffer: UnsafeMutableRawBufferPointer) -> Int {
            lock.withLock {
                if ended { return -1 }
                switch stream.read(into: buffer) {
                case .bytes(let count): return count
                case .end: return -1
                case .wait:
                    if wokenWhileReading {
                        wokenWhileReading = false
                        return 0
                    }
                    suspended = true
                    MHD_suspend_connection(connection)
                    return 0
                }
            }
        }

        func wake() {
            lock.withLock {
                guard !gone else { return }
                if suspended {
                    suspended = false
                    MHD_resume_connection(connection)
                } else {
                    wokenWhileReading = true
                }
            }
        }

        /// Ends the body at its next read (the server stops).
        func end() {
            lock.withLock { ended = true }
            wake()
        }

        func closed() {
            lock.withLock { gone = true }
            stream.close()
        }
    }

    private static func value(_ connection: OpaquePointer, _ kind: MHD_ValueKind, _ name: String) -> String? {
        MHD_lookup_connection_value(connection, kind, name).map { String(cString: $0) }
    }

    /// Every header or query argument of the request.
    private static func values(_ connection: OpaquePointer, _ kind: MHD_ValueKind, lowercased: Bool) -> [String: String] {
        final class Collected { var values: [String: String] = [:] }
        let collected = Collected()
        _ = withExtendedLifetime(collected) {
            MHD_get_connection_values(connection, kind, { cls, _, key, value in
                guard let cls, let key else { return .YES }
                let collected = Unmanaged<Collected>.fromOpaque(cls).takeUnretainedValue()
                let name = String(cString: key)
                // The first of repeated names wins, as for a single-valued lookup.
                if collected.values[name] == nil { collected.values[name] = value.map { String(cString: $0) } ?? "" }
                return .YES
            }, Unmanaged.passUnretained(collected).toOpaque())
        }
        guard lowercased else { return collected.values }
        return Dictionary(collected.values.map { ($0.key.lowercased(), $0.value) }) { first, _ in first }
    }
}
