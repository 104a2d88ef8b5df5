/// The hypervisor services a backend needs, opened once: real Xen (`xen()`), or the
/// simulator's (SimHypervisor) under `--sim DIR`.
public struct HypervisorServices: Sendable {
    public let grants: any GrantMapper
    /// Opens an event channel handle. The data plane takes one per ring, as the kernel gives
    /// each ring its own interrupt: each worker waits on its own fd and drains only its own port.
    public let openEventChannels: @Sendable () throws -> any EventChannels

    public init(grants: any GrantMapper, openEventChannels: @escaping @Sendable () throws -> any EventChannels) {
        self.grants = grants
        self.openEventChannels = openEventChannels
    }

    /// /dev/xen/gntdev and /dev/xen/evtchn; an event channel handle is opened once here so a
    /// missing device is reported at start, not at the first connect.
    public static func xen() throws -> HypervisorServices {
        let grants = try XenGrantMapper()
        _ = try XenEventChannels()
        return HypervisorServices(grants: grants, openEventChannels: { try XenEventChannels() })
    }
}
