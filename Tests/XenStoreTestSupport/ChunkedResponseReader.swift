import Foundation

/// An HTTP/1.1 response read straight from a socket, as a test's own minimal client sees it:
/// the status, then the body with its chunked framing removed (an event stream's lines may
/// be split across chunks).
public struct ChunkedResponseReader {
    private let fd: Int32
    private var raw: [UInt8] = []
    public private(set) var status: Int?
    /// Body bytes left in the current chunk; nil: a size line comes next.
    private var chunkLeft: Int?
    /// The last chunk came.
    private var ended = false
    /// The socket ended (or failed).
    private var closed = false
    /// The body decoded so far.
    public private(set) var body: [UInt8] = []
    public var text: String { String(decoding: body, as: UTF8.self) }

    public init(socket fd: Int32) { self.fd = fd }

    /// Reads until `done` holds for the decoded body, the response ends or `seconds` pass;
    /// returns whether `done` held.
    @discardableResult
    public mutating func read(for seconds: Double = 60, until done: (String) -> Bool) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while true {
            if status != nil, done(text) { return true }
            guard let more = next(deadline: deadline) else { return false }
            body += more
        }
    }

    /// The body bytes decoded from what the socket gives next; nil once the response ended
    /// (or the socket did, or the deadline passed).
    public mutating func next(deadline: Date) -> [UInt8]? {
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let decoded = decode()
            if !decoded.isEmpty { return decoded }
            if ended || closed || Date() >= deadline { return nil }
            let count = Glibc.read(fd, &buffer, buffer.count)
            if count <= 0 {
                if count < 0, errno == EAGAIN || errno == EINTR { continue }
                closed = true
                continue
            }
            raw += buffer[..<count]
        }
    }

    private mutating func decode() -> [UInt8] {
        var out: [UInt8] = []
        if status == nil {
            guard let end = Self.find([13, 10, 13, 10], in: raw) else { return out }
            let head = String(decoding: raw[..<end], as: UTF8.self)
            status = head.split(separator: " ").dropFirst().first.flatMap { Int($0) }
            raw.removeFirst(end + 4)
        }
        while !ended {
            if let left = chunkLeft, left > 0 {
                let take = min(left, raw.count)
                guard take > 0 else { return out }
                out += raw[..<take]
                raw.removeFirst(take)
                chunkLeft = left - take
            } else if chunkLeft == 0 {
                // The CRLF after a chunk's data.
                guard raw.count >= 2 else { return out }
                raw.removeFirst(2)
                chunkLeft = nil
            } else {
                guard let end = Self.find([13, 10], in: raw) else { return out }
                let size = Int(String(decoding: raw[..<end], as: UTF8.self).split(separator: ";")[0], radix: 16) ?? 0
                raw.removeFirst(end + 2)
                if size == 0 { ended = true } else { chunkLeft = size }
            }
        }
        return out
    }

    private static func find(_ needle: [UInt8], in haystack: [UInt8]) -> Int? {
        guard haystack.count >= needle.count else { return nil }
        for start in 0...(haystack.count - needle.count) where haystack[start..<(start + needle.count)].elementsEqual(needle) {
            return start
        }
        return nil
    }
}
