import Logging
import VBDInterface
import Xenbus

/// What every VBD shares: the xenstore connection, the configuration and the data plane.
struct ControlPlaneContext {
    let store: XenStore
    let configuration: BackendConfiguration
    let dataPlane: (any DataPlane)?
    let logger: Logger
    /// What happens to the VBDs, for the API's event stream.
    let events: VBDEventLog
    /// Backing stores opened and tried off the control-plane thread.
    let openings: StoreOpenings
}

/// The watch tokens the control plane registers; the token routes an event to its handler.
enum WatchToken: Equatable, Hashable {
    /// backend/<kind>: device directories appearing and going.
    case backendTree(kind: String)
    /// <frontend>/state of this VBD.
    case frontendState(VBDIdentity)
    /// <backend>/physical-device of this VBD, written by the hotplug script.
    case physicalDevice(VBDIdentity)

    var text: String {
        switch self {
        case .backendTree(let kind): "backend:" + kind
        case .frontendState(let vbd): "frontend-state:\(vbd)"
        case .physicalDevice(let vbd): "physical-device:\(vbd)"
        }
    }

    init?(_ text: String) {
        guard let colon = text.firstIndex(of: ":") else { return nil }
        let value = text[text.index(after: colon)...]
        switch text[..<colon] {
        case "backend": self = .backendTree(kind: String(value))
        case "frontend-state": guard let vbd = VBDIdentity(description: value) else { return nil }; self = .frontendState(vbd)
        case "physical-device": guard let vbd = VBDIdentity(description: value) else { return nil }; self = .physicalDevice(vbd)
        default: return nil
        }
    }
}

/// The backend's `mode` key. Like the kernel (strchr(mode, 'w')), any 'w' makes it writable.
enum AccessMode: String {
    case read = "r"
    case write = "w"

    init(xenstore value: String) { self = value.contains("w") ? .write : .read }
}
