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
    /// blkfront's persistent grants of this ring (rinfo->grants): pages granted writable once
    /// and reused by later requests, the most recently returned first.
    private var persistentPool: [GrantedPage] = []

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
        pages.release(ringPages + persistentPool)
        persistentPool = []
    }

    /// get_grant with persistent grants: pages from the pool, new writable grants for the rest;
    /// `fill` sees every page before it is used, as blkfront copies the bio into it.
    func persistentPages(_ count: Int, pages: GrantedPages, backend: UInt32,
                         fill: (Int, UnsafeMutableRawPointer) -> Void) throws -> [GrantedPage] {
        let reused = Array(persistentPool.suffix(count).reversed())
        persistentPool.removeLast(reused.count)
        for (index, page) in reused.enumerated() { fill(index, pages.pointer(page)) }
        do {
            let fresh = try pages.grant(count - reused.count, to: backend, readOnly: false) { fill(reused.count + $0, $1) }
            return reused + fresh
        } catch {
            persistentPool.append(contentsOf: reused)
            throw error
        }
    }

    /// blkif_completion with persistent grants: a page the backend still maps stays in the
    /// pool; one it let go (its cache was full, or it purged it) has its grant ended.
    func returnPersistent(_ granted: [GrantedPage], pages: GrantedPages) {
        for page in granted.reversed() {
            if pages.grants.isMappedByBackend(page.ref) {
                persistentPool.append(page)
            } else {
                pages.release([page])
            }
        }
    }

    /// This queue as a ring description names it: its ring pages' refs and its event channel.
    var ringQueue: RingQueue { RingQueue(ringRefs: ringPages.map(\.ref), eventChannel: port) }
}
