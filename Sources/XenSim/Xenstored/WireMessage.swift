/// The xenstored socket protocol of xs_wire.h: a 16-byte header of four little-endian u32
/// {type, req_id, tx_id, len} followed by `len` payload bytes (at most 4096).
public enum XenstoreMessageType: UInt32, Sendable, CaseIterable {
    case control = 0
    case directory = 1
    case read = 2
    case getPermissions = 3
    case watch = 4
    case unwatch = 5
    case transactionStart = 6
    case transactionEnd = 7
    case introduce = 8
    case release = 9
    case getDomainPath = 10
    case write = 11
    case mkdir = 12
    case rm = 13
    case setPermissions = 14
    case watchEvent = 15
    case error = 16
    case isDomainIntroduced = 17
    case resume = 18
    case setTarget = 19
    case resetWatches = 21
    case directoryPart = 22
}

public struct WireMessage: Equatable, Sendable {
    public static let headerSize = 16
    /// XENSTORE_PAYLOAD_MAX: the limit in both directions.
    public static let maxPayload = 4096

    /// Kept raw: an unknown type must be answered (ENOSYS), not dropped by the decoder.
    public var rawType: UInt32
    public var requestID: UInt32
    public var transactionID: UInt32
    public var payload: [UInt8]

    public init(rawType: UInt32, requestID: UInt32 = 0, transactionID: UInt32 = 0, payload: [UInt8] = []) {
        self.rawType = rawType
        self.requestID = requestID
        self.transactionID = transactionID
        self.payload = payload
    }

    public init(_ type: XenstoreMessageType, requestID: UInt32 = 0, transactionID: UInt32 = 0, payload: [UInt8] = []) {
        self.init(rawType: type.rawValue, requestID: requestID, transactionID: transactionID, payload: payload)
    }

    /// A request or reply whose payload is NUL-terminated strings ("a\0b\0").
    public init(_ type: XenstoreMessageType, requestID: UInt32 = 0, transactionID: UInt32 = 0, strings: [String]) {
        self.init(type, requestID: requestID, transactionID: transactionID,
                  payload: Self.nulTerminated(strings))
    }

    /// "a\0b\0": how xenstore lists strings on the wire.
    public static func nulTerminated(_ strings: [String]) -> [UInt8] {
        var bytes: [UInt8] = []
        for string in strings {
            bytes.append(contentsOf: string.utf8)
            bytes.append(0)
        }
        return bytes
    }

    public var type: XenstoreMessageType? { XenstoreMessageType(rawValue: rawType) }

    public func encoded() -> [UInt8] {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(Self.headerSize + payload.count)
        for field in [rawType, requestID, transactionID, UInt32(payload.count)] {
            withUnsafeBytes(of: field.littleEndian) { bytes.append(contentsOf: $0) }
        }
        bytes.append(contentsOf: payload)
        return bytes
    }

    /// The NUL-terminated strings of the payload, as xenstored's get_strings sees them: bytes
    /// after the last NUL are not a string.
    public var strings: [[UInt8]] {
        var result: [[UInt8]] = []
        var start = 0
        for (index, byte) in payload.enumerated() where byte == 0 {
            result.append(Array(payload[start..<index]))
            start = index + 1
        }
        return result
    }

    /// The single argument of a one-argument request: the payload must hold exactly one NUL,
    /// at its end.
    public var singleArgument: [UInt8]? {
        guard let last = payload.last, last == 0, payload.firstIndex(of: 0) == payload.count - 1 else { return nil }
        return Array(payload.dropLast())
    }
}

/// Frames a byte stream into messages. Holds at most one partial message, so a client can
/// never make it buffer more than header + XENSTORE_PAYLOAD_MAX bytes.
public struct WireDecoder: Sendable {
    public enum Failure: Error, Equatable, Sendable {
        /// xenstored drops a client that announces a payload above XENSTORE_PAYLOAD_MAX.
        case oversized(length: UInt32)
    }

    private var buffer: [UInt8] = []
    private var start = 0

    public init() {}

    public mutating func append(_ bytes: some Collection<UInt8>) {
        if start > 0 && start == buffer.count {
            buffer.removeAll(keepingCapacity: true)
            start = 0
        }
        buffer.append(contentsOf: bytes)
    }

    /// Bytes received but not yet framed.
    public var pendingCount: Int { buffer.count - start }

    /// The next complete message, nil when more bytes are needed.
    public mutating func next() throws(Failure) -> WireMessage? {
        guard pendingCount >= WireMessage.headerSize else { return nil }
        func field(_ index: Int) -> UInt32 {
            let base = start + index * 4
            return UInt32(buffer[base]) | UInt32(buffer[base + 1]) << 8
                | UInt32(buffer[base + 2]) << 16 | UInt32(buffer[base + 3]) << 24
        }
        let length = field(3)
        guard length <= WireMessage.maxPayload else { throw .oversized(length: length) }
        let total = WireMessage.headerSize + Int(length)
        guard pendingCount >= total else { return nil }
        let payloadStart = start + WireMessage.headerSize
        let message = WireMessage(rawType: field(0), requestID: field(1), transactionID: field(2),
                                  payload: Array(buffer[payloadStart..<(payloadStart + Int(length))]))
        start += total
        if start > 65536 {
            buffer.removeFirst(start)
            start = 0
        }
        return message
    }
}
