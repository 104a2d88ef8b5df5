import Foundation

/// The TCP side of the tests' minimal HTTP clients: a connection over loopback from a chosen
/// 127.x source address (each counts as its own client for per-address limits).
public enum LoopbackSocket {
    public struct Failure: Error, CustomStringConvertible {
        public let description: String
    }

    /// A connected socket with a receive timeout of `timeout` seconds (and a small receive
    /// buffer when asked).
    public static func connect(port: UInt16, source: String = "127.0.0.1", receiveBuffer: Int32? = nil,
                               timeout: Int = 30) throws -> Int32 {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw Failure(description: "socket: \(String(cString: strerror(errno)))") }
        if var size = receiveBuffer { setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size)) }
        var limit = timeval(tv_sec: timeout, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &limit, socklen_t(MemoryLayout<timeval>.size))
        func address(_ host: String, _ port: UInt16) -> sockaddr_in {
            var address = sockaddr_in()
            address.sin_family = sa_family_t(AF_INET)
            address.sin_port = port.bigEndian
            address.sin_addr.s_addr = inet_addr(host)
            return address
        }
        var local = address(source, 0), remote = address("127.0.0.1", port)
        let length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let connected = withUnsafePointer(to: &local) { localPointer in
            withUnsafePointer(to: &remote) { remotePointer in
                localPointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) } == 0
                    && remotePointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, length) } == 0
            }
        }
        guard connected else {
            let error = String(cString: strerror(errno))
            close(fd)
            throw Failure(description: "connect from \(source) to port \(port): \(error)")
        }
        return fd
    }

    /// Writes all of `text`.
    public static func send(_ fd: Int32, _ text: String) throws {
        let bytes = Array(text.utf8)
        var sent = 0
        while sent < bytes.count {
            let count = bytes[sent...].withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
            guard count > 0 else { throw Failure(description: "write: \(String(cString: strerror(errno)))") }
            sent += count
        }
    }

    /// Reads until the server closes the connection (or the receive timeout passes): the
    /// status of the response and everything received.
    public static func readResponse(_ fd: Int32) -> (status: Int?, text: String) {
        var received: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let count = read(fd, &buffer, buffer.count)
            guard count > 0 else { break }
            received += buffer[0..<count]
        }
        let text = String(decoding: received, as: UTF8.self)
        let status = text.split(separator: " ", maxSplits: 2).dropFirst().first.flatMap { Int($0) }
        return (text.hasPrefix("HTTP/1.1 ") ? status : nil, text)
    }

    /// One request with `Connection: close`, from `source`: status and response text.
    public static func exchange(port: UInt16, _ method: String, _ path: String, body: String = "",
                                source: String = "127.0.0.1", timeout: Int = 30) throws -> (status: Int?, text: String) {
        let fd = try connect(port: port, source: source, timeout: timeout)
        defer { close(fd) }
        try send(fd, "\(method) \(path) HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: \(body.utf8.count)\r\n\r\n\(body)")
        return readResponse(fd)
    }
}
