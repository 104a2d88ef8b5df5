import API
import Logging

/// The real HTTP server on a free loopback port, serving `api` (stop it when done).
func startLoopbackServer(_ api: ManagementAPI, configure: (inout HTTPServer.Configuration) -> Void = { _ in })
    throws -> (server: HTTPServer, port: UInt16)? {
    for _ in 0..<5 {
        let port = UInt16.random(in: 20000...60000)
        var configuration = HTTPServer.Configuration(address: try ListenAddress("127.0.0.1:\(port)"))
        configure(&configuration)
        let server = HTTPServer(configuration: configuration, logger: Logger(label: "test"),
                                errorResponse: { ManagementAPI.errorResponse($0, $1) }, handler: { api.respond($0) })
        if (try? server.start()) != nil { return (server, port) }
    }
    return nil
}
