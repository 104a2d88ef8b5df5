import Blkif
import Hypervisor
import SimHypervisor
import Xenbus

/// One blkif queue of the guest: its shared ring (2^order granted pages, SHARED_RING_INIT
/// done), the front half's indices, and the event channel allocated for the backend
/// (setup_blkring).
final class BlockfrontQueue {
    let index: Int
    let ringPages: [GrantedPage]
    var ring: FrontRing
    let port: UInt32

    init(index: Int, pageOrder: Int, protocol abi: BlkifProtocol, backend: UInt32,
         pages: GrantedPages, eventChannels: GuestEventChannels) throws {
        let granted = try pages.grantContiguous(1 << pageOrder, to: backend)
        do {
            port = try eventChannels.allocUnbound(remoteDomain: backend)
        } catch {
            pages.release(granted)
            throw error
        }
        self.index = index
        ringPages = granted
        let shared = SharedRing(memory: pages.pointer(granted[0]), pageCount: granted.count, protocol: abi)
        ring = FrontRing(initializing: shared)
    }

    /// xenbus_free_evtchn and the ring pages' end of foreign access (pages the backend still
    /// maps stay aside in `pages.busy`).
    func release(pages: GrantedPages, eventChannels: GuestEventChannels) {
        try? eventChannels.unbind(port)
        pages.release(ringPages)
    }

    /// This queue as a ring description names it: its ring pages' refs and its event channel.
    var ringQueue: RingQueue { RingQueue(ringRefs: ringPages.map(\.ref), eventChannel: port) }
}
