import Foundation

/// The xenbus device states of xen/io/xenbus.h, as both ends write them into `state`.
public enum XenbusState: Int, Sendable, CaseIterable, CustomStringConvertible {
    case unknown = 0
    case initialising = 1
    case initWait = 2
    case initialised = 3
    case connected = 4
    case closing = 5
    case closed = 6
    case reconfiguring = 7
    case reconfigured = 8

    /// Parses a `state` node's value; a missing node, or anything but a known number, is `nil`.
    public init?(node value: String?) {
        guard let value, let state = FrontendStateReading(node: value).state else { return nil }
        self = state
    }

    /// The names the API and the logs use (the ones xenbus.c prints).
    public var description: String {
        switch self {
        case .unknown: "Unknown"
        case .initialising: "Initialising"
        case .initWait: "InitWait"
        case .initialised: "Initialised"
        case .connected: "Connected"
        case .closing: "Closing"
        case .closed: "Closed"
        case .reconfiguring: "Reconfiguring"
        case .reconfigured: "Reconfigured"
        }
    }
}

/// What the frontend's `state` node said, read the way xenbus_read_driver_state reads it:
/// a missing node is Unknown (the frontend directory is gone).
public enum FrontendStateReading: Equatable, Sendable, CustomStringConvertible {
    /// A number; it may lie outside the states xenbus.h defines.
    case number(Int)
    /// Present but not a number: the text as `XenbusValue.sanitized` escapes and bounds it.
    case garbage(String)

    public static let unknown = FrontendStateReading.number(XenbusState.unknown.rawValue)

    /// Parses the node's value (nil = node missing).
    public init(node value: String?) {
        guard let value else { self = .unknown; return }
        let trimmed = value.trimmingCharacters(in: .whitespaces)
        if let number = Int(trimmed) { self = .number(number) } else { self = .garbage(XenbusValue.sanitized(value)) }
    }

    public var state: XenbusState? {
        if case .number(let number) = self { return XenbusState(rawValue: number) }
        return nil
    }

    public var description: String {
        switch self {
        case .number(let number): XenbusState(rawValue: number)?.description ?? "\(number)"
        case .garbage(let text): "'\(text)'"
        }
    }
}
