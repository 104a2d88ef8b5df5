import Glibc

/// A TCP address to listen on, as given on the command line: "host:port", "[v6]:port",
/// or "localhost:port".
public struct ListenAddress: Equatable, Sendable, CustomStringConvertible {
    public var host: String
    public var port: UInt16
    public var isIPv6: Bool

    /// Parses and checks the address; throws one line saying what is wrong.
    public init(_ text: String) throws(ListenAddressError) {
        let hostPart: Substring, portPart: Substring
        if text.hasPrefix("[") {
            guard let close = text.firstIndex(of: "]"), text[text.index(after: close)...].hasPrefix(":") else {
                throw ListenAddressError("listen address '\(text)': expected [IPv6]:PORT")
            }
            hostPart = text[text.index(after: text.startIndex)..<close]
            portPart = text[text.index(close, offsetBy: 2)...]
        } else {
            guard let colon = text.lastIndex(of: ":") else {
                throw ListenAddressError("listen address '\(text)': expected HOST:PORT, e.g. 127.0.0.1:8080")
            }
            hostPart = text[..<colon]
            portPart = text[text.index(after: colon)...]
        }
        guard let port = UInt16(portPart), port > 0 else {
            throw ListenAddressError("listen address '\(text)': port '\(portPart)' is not in 1...65535")
        }
        var scratch = in6_addr()
        let host = hostPart == "localhost" ? "127.0.0.1" : String(hostPart)
        if inet_pton(AF_INET, host, &scratch) == 1 {
            isIPv6 = false
        } else if inet_pton(AF_INET6, host, &scratch) == 1 {
            isIPv6 = true
        } else {
            throw ListenAddressError("listen address '\(text)': '\(hostPart)' is not an IPv4 or IPv6 address")
        }
        self.host = host
        self.port = port
    }

    /// 127.0.0.0/8 or ::1: reachable only from this machine.
    public var isLoopback: Bool {
        if isIPv6 {
            var address = in6_addr()
            guard inet_pton(AF_INET6, host, &address) == 1 else { return false }
            return withUnsafeBytes(of: &address) { bytes in bytes.dropLast().allSatisfy { $0 == 0 } && bytes.last == 1 }
        }
        return host.hasPrefix("127.")
    }

    public var description: String { isIPv6 ? "[\(host)]:\(port)" : "\(host):\(port)" }
}

public struct ListenAddressError: Error, Equatable, Sendable, CustomStringConvertible {
    public var description: String
    init(_ description: String) { self.description = description }
}
