@testable import DataPlane
import Engine
import Foundation
import SimHypervisor
import Synchronization
import Testing
import XenSim

/// Counts the calls it forwards to the simulator's real grant mapper: how many hypercalls
/// (gntdev ioctls on real Xen) the data plane makes.
final class CountingGrantMapper: GrantMapper, @unchecked Sendable {
    let inner: SimGrantMapper
    private let calls = Mutex<[Int]>([])
    var unmapIsSynchronousAfterDirectIO: Bool { inner.unmapIsSynchronousAfterDirectIO }
    /// Pages per map call so far.
    var mapCalls: [Int] { calls.withLock { $0 } }

    init(directory: String) { inner = SimGrantMapper(directory: directory) }

    func map(domain: UInt32, refs: [UInt32], writable: Bool) throws -> GrantMapping {
        calls.withLock { $0.append(refs.count) }
        return try inner.map(domain: domain, refs: refs, writable: writable)
    }

    func copy(domain: UInt32, _ direction: GrantCopyDirection, _ segments: [GrantCopySegment]) throws {
        try inner.copy(domain: domain, direction, segments)
    }
}

/// The ring's grant cache (RingGrants) against the simulated hypervisor's grant table, whose
/// flags say what the backend maps: what Linux blkback's persistent grants promise.
@Suite(.serialized) struct PersistentGrantTests {
    let dir = SimDirectory()
    let domid: UInt32 = 1
    let memory: GuestMemory
    let table: GuestGrantTable
    let mapper: CountingGrantMapper

    init() throws {
        try SimDomain.createDomain(directory: dir.path, domid: domid, memoryMB: 8)
        memory = try GuestMemory(directory: dir.path, domid: domid)
        table = try GuestGrantTable(directory: dir.path, domid: domid)
        mapper = CountingGrantMapper(directory: dir.path)
    }

    func grant(_ count: Int, readOnly: Bool = false) throws -> [UInt32] {
        try memory.allocatePages(count).enumerated().map { index, frame in
            memory.page(frame).storeBytes(of: UInt64(0xC0DE_0000 + index), as: UInt64.self)
            return try table.grantAccess(frame: frame, to: 0, readOnly: readOnly)
        }
    }

    func grants(persistent: Bool = true, capacity: Int = 1056, ringRefs: Set<UInt32> = [],
                budget: DomainGrantBudget = DomainGrantBudget(limit: 1 << 20)) -> RingGrants {
        RingGrants(mapper: mapper, domain: domid, budget: budget, ringRefs: ringRefs, persistent: persistent, capacity: capacity)
    }

    func request(_ refs: [UInt32], reading: Bool = true) -> RequestGrants {
        let request = RequestGrants(capacity: refs.count, copyable: true)
        request.reset(refs: refs, writesGuestPages: reading)
        return request
    }

    func mapped(_ ref: UInt32) -> Bool { table.isMappedByBackend(ref) }

    @Test func persistentGrantsStayMappedAndAreHitWithoutAHypercall() throws {
        defer { dir.remove() }
        let cache = grants()
        let refs = try grant(3)
        let first = request(refs)
        try cache.plan(first, now: 1)
        cache.mapMissing(CollectionOfOne(first))
        #expect(first.refusal == nil)
        #expect(mapper.mapCalls == [3])
        #expect(first.page(1).load(as: UInt64.self) == 0xC0DE_0001)
        let pages = (0..<3).map { first.page($0) }
        #expect(cache.release(first).isEmpty)
        #expect(refs.allSatisfy(mapped), "persistent grants are unmapped only when purged")
        #expect(cache.persistentCount == 3)

        // The same refs again, in another order and for a WRITE: served from the cache.
        let second = request([refs[2], refs[0]], reading: false)
        try cache.plan(second, now: 2)
        #expect(second.page(0) == pages[2] && second.page(1) == pages[0])
        cache.mapMissing(CollectionOfOne(second))
        #expect(mapper.mapCalls == [3], "hits need no mapping")
        _ = cache.release(second)
        #expect(cache.releaseAll().isEmpty)
        #expect(!refs.contains(where: mapped))
    }

    @Test func aBatchOfRequestsIsMappedWithOneCallPerKind() throws {
        defer { dir.remove() }
        let off = grants(persistent: false)
        let reads = try (0..<4).map { _ in request(try grant(2), reading: true) }
        let writes = try (0..<3).map { _ in request(try grant(3, readOnly: true), reading: false) }
        for r in reads + writes { try off.plan(r, now: 1) }
        off.mapMissing(reads + writes)
        // Reads need writable mappings, writes read-only ones (the guest granted them so).
        #expect(mapper.mapCalls.sorted() == [8, 9])
        #expect((reads + writes).allSatisfy { $0.refusal == nil })
        for r in reads + writes { #expect(off.release(r).isEmpty) }
        #expect(!(reads + writes).flatMap(\.refs).contains(where: mapped), "without persistent grants nothing stays mapped")
    }

    @Test func onlyTheRequestNamingABadRefFailsItsBatch() throws {
        defer { dir.remove() }
        let cache = grants()
        let good = request(try grant(2))
        let neverGranted = UInt32(table.entryCount - 1)
        let bad = request(try grant(1) + [neverGranted])
        try cache.plan(good, now: 1)
        try cache.plan(bad, now: 1)
        cache.mapMissing([good, bad])
        #expect(good.refusal == nil)
        guard case .unmappable = bad.refusal else { Issue.record("bad request: \(String(describing: bad.refusal))"); return }
        #expect(!bad.refs.contains(where: mapped), "the refused request holds nothing")
        #expect(cache.persistentCount == 2)
        _ = cache.release(good)
        _ = cache.releaseAll()
    }

    @Test func ringPagesRepeatedRefsAndRefsInUseAreRefused() throws {
        defer { dir.remove() }
        let refs = try grant(3)
        let cache = grants(ringRefs: [refs[2]])
        #expect(throws: GrantRefusal.self) { try cache.plan(request([refs[0], refs[2]]), now: 1) }
        #expect(throws: GrantRefusal.self) { try cache.plan(request([refs[0], refs[1], refs[0]]), now: 1) }
        let holder = request([refs[0]])
        try cache.plan(holder, now: 1)
        cache.mapMissing(CollectionOfOne(holder))
        let second = request([refs[1], refs[0]])
        do {
            try cache.plan(second, now: 2)
            Issue.record("a grant held by another request was accepted")
        } catch {
            guard case .inUse(refs[0]) = error else { Issue.record("\(error)"); return }
        }
        // The refused request reserved nothing: refs[1] can be used by the next one.
        let third = request([refs[1]])
        try cache.plan(third, now: 3)
        cache.mapMissing(CollectionOfOne(third))
        #expect(third.refusal == nil && cache.persistentCount == 2)
        _ = cache.release(holder)
        _ = cache.release(third)
        _ = cache.releaseAll()
    }

    @Test func pagesPastTheLimitAreMappedForTheirRequestOnly() throws {
        defer { dir.remove() }
        let cache = grants(capacity: 2)
        let refs = try grant(5)
        let r = request(refs)
        try cache.plan(r, now: 1)
        cache.mapMissing(CollectionOfOne(r))
        #expect(mapper.mapCalls == [2, 3], "the persistent part and the rest are separate ranges")
        #expect(r.refusal == nil)
        _ = cache.release(r)
        #expect(cache.persistentCount == 2)
        #expect(refs.filter(mapped).count == 2)
        _ = cache.releaseAll()
    }

    @Test func withCopyPagesPastTheLimitAreCopiedNotMapped() throws {
        defer { dir.remove() }
        let cache = RingGrants(mapper: mapper, domain: domid, budget: DomainGrantBudget(limit: 1 << 20), ringRefs: [],
                               persistent: true, capacity: 2, copyTransient: true)
        let refs = try grant(4)
        let r = request(refs)
        try cache.plan(r, now: 1)
        cache.mapMissing(CollectionOfOne(r))
        #expect(mapper.mapCalls == [2], "only the persistent part is mapped")
        #expect(r.copied == [2, 3])
        _ = cache.release(r)
        #expect(refs.filter(mapped) == Array(refs.prefix(2)))
        // Indirect descriptor pages are never copied: the backend reads them itself.
        let indirect = RequestGrants(capacity: 1, copyable: false)
        indirect.reset(refs: [refs[3]], writesGuestPages: false)
        try cache.plan(indirect, now: 2)
        cache.mapMissing(CollectionOfOne(indirect))
        #expect(indirect.copied.isEmpty && indirect.page(0).load(as: UInt64.self) == 0xC0DE_0003)
        _ = cache.release(indirect)
        _ = cache.releaseAll()
    }

    /// One guest's rings share its grant cap: pages past it are copied, never mapped and never
    /// refused, and the cap comes back as requests finish and persistent grants are purged.
    @Test func pagesPastTheDomainsGrantCapAreCopiedAndTheCapComesBack() throws {
        defer { dir.remove() }
        let budget = DomainGrantBudget(limit: 6)
        let ringA = grants(persistent: true, capacity: 4, budget: budget)
        let ringB = grants(persistent: false, budget: budget)
        let refs = try grant(10)

        // Ring A: 4 persistent entries and 1 more mapped page take 5 of the 6.
        let a = request(Array(refs[0..<5]))
        try ringA.plan(a, now: 1)
        ringA.mapMissing(CollectionOfOne(a))
        #expect(a.refusal == nil && a.copied.isEmpty && a.copiedOverCap == 0)
        #expect(budget.inUse == 5)
        // Ring B: one page left to map; the other four are copied.
        let b = request(Array(refs[5..<10]))
        try ringB.plan(b, now: 1)
        ringB.mapMissing(CollectionOfOne(b))
        #expect(b.refusal == nil && b.copied == [1, 2, 3, 4] && b.copiedOverCap == 4)
        #expect(budget.inUse == 6)
        #expect(refs[5..<10].filter(mapped).count == 1, "pages past the cap are not mapped")

        _ = ringB.release(b)
        _ = ringA.release(a)
        #expect(budget.inUse == 4, "the persistent entries keep theirs until purged")
        _ = ringA.releaseAll()
        #expect(budget.inUse == 0)
        #expect(!refs.contains(where: mapped))
    }

    @Test func grantCopyMovesBytesAndHoldsTheGrantOnlyMeanwhile() throws {
        defer { dir.remove() }
        let refs = try grant(2)
        let readOnly = try grant(1, readOnly: true)
        let local = UnsafeMutableRawPointer.allocate(byteCount: 8192, alignment: 4096)
        defer { local.deallocate() }
        memset(local, 0, 8192)
        try mapper.copy(domain: domid, .fromGuest, [GrantCopySegment(ref: refs[1], offset: 0, length: 512, local: local)])
        #expect(local.load(as: UInt64.self) == 0xC0DE_0001)
        local.storeBytes(of: UInt64(0xFEED), toByteOffset: 1024, as: UInt64.self)
        try mapper.copy(domain: domid, .toGuest, [GrantCopySegment(ref: refs[0], offset: 1024, length: 512, local: local + 1024)])
        let frame = table.entry(refs[0]).frame
        #expect(memory.page(frame).load(fromByteOffset: 1024, as: UInt64.self) == 0xFEED)
        #expect(!refs.contains(where: mapped), "a copy holds the grant only while it copies")
        #expect(throws: HypervisorError.self) {
            try mapper.copy(domain: domid, .toGuest, [GrantCopySegment(ref: readOnly[0], offset: 0, length: 512, local: local)])
        }
        #expect(throws: HypervisorError.self) {
            try mapper.copy(domain: domid, .fromGuest, [GrantCopySegment(ref: refs[0], offset: 3584, length: 1024, local: local)])
        }
        #expect(!(refs + readOnly).contains(where: mapped))
    }

    @Test func idleGrantsArePurgedLeastRecentlyUsedFirstAndAfterSixtySeconds() throws {
        defer { dir.remove() }
        let cache = grants(capacity: 20)
        let refs = try grant(20)
        for (index, ref) in refs.enumerated() {
            let r = request([ref])
            try cache.plan(r, now: UInt64(index + 1))
            cache.mapMissing(CollectionOfOne(r))
            _ = cache.release(r)
        }
        #expect(cache.persistentCount == 20)
        let start = RingGrants.purgeIntervalNanoseconds
        // Full: the least recently used 5 % (one of 20) goes.
        #expect(cache.purgeIfDue(now: start).isEmpty)
        #expect(cache.persistentCount == 19 && !mapped(refs[0]) && mapped(refs[1]))
        // Not due again within the interval.
        _ = cache.purgeIfDue(now: start + 1)
        #expect(cache.persistentCount == 19)
        // A grant in use is never purged, however old.
        let busy = request([refs[5]])
        try cache.plan(busy, now: 30)
        let later = 30 + RingGrants.idleLimitNanoseconds
        _ = cache.purgeIfDue(now: later)
        #expect(cache.persistentCount == 1 && mapped(refs[5]))
        _ = cache.release(busy)
        _ = cache.purgeIfDue(now: 2 * later)
        #expect(cache.persistentCount == 0 && !refs.contains(where: mapped))
    }

    /// Entries mapped by one call go together, and only once none of them is in use: gntdev
    /// unmaps a call's range only as a whole, so a purge that took some of them would leave
    /// every page mapped, past the cache's bound.
    @Test func thePurgeTakesWholeMappingsSoWhatItTakesIsUnmapped() throws {
        defer { dir.remove() }
        let budget = DomainGrantBudget(limit: 1 << 20)
        let cache = grants(capacity: 8, budget: budget)
        let refs = try grant(8)
        // Two mappings of four: one request each.
        let first = request(Array(refs[0..<4])), second = request(Array(refs[4..<8]))
        try cache.plan(first, now: 1)
        cache.mapMissing(CollectionOfOne(first))
        try cache.plan(second, now: 2)
        cache.mapMissing(CollectionOfOne(second))
        #expect(mapper.mapCalls == [4, 4])
        _ = cache.release(first)
        // Full, and 5 % of 8 is one entry: the whole least recently used idle mapping goes.
        _ = cache.purgeIfDue(now: RingGrants.purgeIntervalNanoseconds)
        #expect(cache.persistentCount == 4)
        #expect(!refs[0..<4].contains(where: mapped) && refs[4..<8].allSatisfy(mapped))
        #expect(budget.inUse == 4)
        // The other mapping is in use: nothing of it goes, however old.
        _ = cache.purgeIfDue(now: 2 * RingGrants.idleLimitNanoseconds)
        #expect(cache.persistentCount == 4 && refs[4..<8].allSatisfy(mapped))
        _ = cache.release(second)
        _ = cache.purgeIfDue(now: 3 * RingGrants.idleLimitNanoseconds)
        #expect(cache.persistentCount == 0 && !refs.contains(where: mapped) && budget.inUse == 0)
    }
}
