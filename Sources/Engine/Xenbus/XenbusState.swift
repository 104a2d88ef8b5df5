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

    /// Parses a `state` node's value; anything but a known number is `nil`.
    public init?(node value: String?) {
        guard let value, let number = Int(value.trimmingCharacters(in: .whitespaces)),
              let state = XenbusState(rawValue: number) else { return nil }
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
