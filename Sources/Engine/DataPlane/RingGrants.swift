import Hypervisor

/// Pages mapped by one call to the grant mapper. gntdev unmaps what one call mapped as a
/// whole, so the range stays until every page's user (a request or a persistent entry) has
/// let go of it.
final class GrantRegion {
    private let mapping: GrantMapping
    private var users: Int

    init(_ mapping: GrantMapping) {
        self.mapping = mapping
        users = mapping.pageCount
    }

    func page(_ index: Int) -> UnsafeMutableRawPointer { mapping.page(index) }

    /// One page's user lets go; the last one unmaps the range.
    func release() throws {
        users -= 1
        if users == 0 { try mapping.unmap() }
    }
}

/// Why a request's grants cannot be used; the request is answered BLKIF_RSP_ERROR.
enum GrantRefusal: Error, CustomStringConvertible {
    /// The ref names a page of one of the device's rings.
    case ringPage(UInt32)
    /// The request names the ref twice.
    case repeated(UInt32)
    /// Another request in flight holds the persistent grant (blkback: "requesting a grant
    /// already in use").
    case inUse(UInt32)
    /// The hypervisor refused to map it.
    case unmappable(String)

    var description: String {
        switch self {
        case .ringPage(let ref): "grant ref \(ref) is a ring page"
        case .repeated(let ref): "grant ref \(ref) appears twice in one request"
        case .inUse(let ref): "grant ref \(ref) is in use by another request"
        case .unmappable(let reason): "mapping: \(reason)"
        }
    }
}

/// One request's grants (data segments, or indirect descriptor pages): page i holds the
/// bytes of refs[i]. Owned by a request slot and reused, so steady-state requests allocate
/// nothing here.
final class RequestGrants {
    private(set) var refs: [UInt32] = []
    /// Filled by `RingGrants.plan` (cache hits) and `RingGrants.mapMissing` (the rest).
    fileprivate(set) var pages: [UnsafeMutableRawPointer?] = []
    /// Whether the backend writes into the pages (a READ); decides the mapping's access when
    /// persistent grants are off.
    private(set) var writesGuestPages = false
    /// Pages still to map: those that become persistent entries, and the others.
    fileprivate var missingPersistent: [Int] = []
    fileprivate var missingTransient: [Int] = []
    /// Pages that travel by grant copy through daemon memory instead of being mapped; the
    /// data plane points `pages` at that memory.
    fileprivate(set) var copied: [Int] = []
    /// Persistent entries this request marked in use.
    fileprivate var held: [UInt32] = []
    /// Pages mapped for this request alone that count against the domain's grant budget.
    fileprivate var budgeted = 0
    /// Pages copied because the domain was at its grant cap (for the statistics).
    fileprivate(set) var copiedOverCap = 0
    /// The region of every page mapped for this request alone.
    fileprivate var transient: [GrantRegion] = []
    fileprivate(set) var refusal: GrantRefusal?
    /// Whether pages may travel by copy: data pages may, indirect descriptor pages (which
    /// the backend itself reads) are always mapped.
    let copyable: Bool

    init(capacity: Int, copyable: Bool) {
        self.copyable = copyable
        refs.reserveCapacity(capacity)
        pages.reserveCapacity(capacity)
        missingPersistent.reserveCapacity(capacity)
        missingTransient.reserveCapacity(capacity)
        copied.reserveCapacity(capacity)
        held.reserveCapacity(capacity)
    }

    func reset(refs newRefs: some Sequence<UInt32>, writesGuestPages: Bool) {
        refs.removeAll(keepingCapacity: true)
        refs.append(contentsOf: newRefs)
        pages.removeAll(keepingCapacity: true)
        pages.append(contentsOf: repeatElement(nil, count: refs.count))
        self.writesGuestPages = writesGuestPages
        copiedOverCap = 0
        refusal = nil
    }

    /// Where a copied page's bytes live in daemon memory.
    func place(_ index: Int, at memory: UnsafeMutableRawPointer) { pages[index] = memory }

    func page(_ index: Int) -> UnsafeMutableRawPointer {
        guard let page = pages[index] else { preconditionFailure("page \(index) of a request used before it was mapped") }
        return page
    }
}

/// The grants one ring's requests use, as Linux blkback keeps them (persistent_gnts): with
/// persistent grants negotiated, up to `capacity` refs stay mapped across requests, purged
/// least recently used first and after 60 s unused; everything else is mapped for one request,
/// or copied when `copyTransient` (where an unmap may lag behind direct I/O, as with gntdev)
/// or when the domain is at its grant cap (`DomainGrantBudget`). A batch of requests misses
/// are mapped with one call per kind of mapping. Worker-thread only.
final class RingGrants {
    /// Linux blkback's LRU_INTERVAL, LRU_PERCENT_CLEAN and xen_blkif_pgrant_timeout.
    static let purgeIntervalNanoseconds: UInt64 = 100_000_000
    static let purgePercent = 5
    static let idleLimitNanoseconds: UInt64 = 60_000_000_000

    private struct Entry {
        /// nil while the request that will map it waits for its batch.
        var region: GrantRegion?
        var page = 0
        var lastUse: UInt64
        var inUse = true
    }

    let persistent: Bool
    let capacity: Int
    let copyTransient: Bool
    private let mapper: any GrantMapper
    private let domain: UInt32
    /// Counts the persistent entries and the data pages mapped per request.
    private let budget: DomainGrantBudget
    private let ringRefs: Set<UInt32>
    private var entries: [UInt32: Entry] = [:]
    private var sorted: [UInt32] = []
    private var lastPurge: UInt64 = 0

    /// `persistent`: the frontend and this backend agreed on feature-persistent.
    init(mapper: any GrantMapper, domain: UInt32, budget: DomainGrantBudget, ringRefs: Set<UInt32>, persistent: Bool,
         capacity: Int, copyTransient: Bool = false) {
        self.copyTransient = copyTransient
        self.mapper = mapper
        self.domain = domain
        self.budget = budget
        self.ringRefs = ringRefs
        self.persistent = persistent
        self.capacity = persistent ? max(capacity, 0) : 0
        entries.reserveCapacity(self.capacity)
    }

    /// Persistent grants mapped now.
    var persistentCount: Int { entries.count }

    /// Checks the request's refs and takes what the cache already maps; refs it misses stay
    /// for `mapMissing`, reserved as persistent entries while there is room. On refusal the
    /// request holds nothing.
    func plan(_ request: RequestGrants, now: UInt64) throws(GrantRefusal) {
        sorted.removeAll(keepingCapacity: true)
        sorted.append(contentsOf: request.refs)
        sorted.sort()
        for (index, ref) in sorted.enumerated() {
            if ringRefs.contains(ref) { throw .ringPage(ref) }
            if index > 0 && sorted[index - 1] == ref { throw .repeated(ref) }
        }
        for (index, ref) in request.refs.enumerated() {
            if persistent, var entry = entries[ref] {
                guard !entry.inUse else {
                    _ = release(request)
                    throw .inUse(ref)
                }
                entry.inUse = true
                entry.lastUse = now
                entries[ref] = entry
                request.held.append(ref)
                if let region = entry.region { request.pages[index] = region.page(entry.page) }
            } else if capacity > entries.count && budget.take() {
                entries[ref] = Entry(region: nil, lastUse: now)
                request.held.append(ref)
                request.missingPersistent.append(index)
            } else if request.copyable && copyTransient {
                request.copied.append(index)
            } else if !request.copyable {
                request.missingTransient.append(index)
            } else if budget.take() {
                request.budgeted += 1
                request.missingTransient.append(index)
            } else {
                request.copiedOverCap += 1
                request.copied.append(index)
            }
        }
    }

    /// Maps every page `requests` still miss: the new persistent entries with one call, the
    /// other pages with one call per access (read-only or writable). A call the hypervisor
    /// refuses (gntdev maps all or nothing) is tried again request by request, so only a
    /// request naming a bad ref fails: it is released and its `refusal` set.
    func mapMissing(_ requests: some Collection<RequestGrants>) {
        var persistentPages: [(RequestGrants, Int)] = []
        var writablePages: [(RequestGrants, Int)] = []
        var readOnlyPages: [(RequestGrants, Int)] = []
        for request in requests {
            for index in request.missingPersistent { persistentPages.append((request, index)) }
            for index in request.missingTransient {
                // Persistent grants are granted writable and mapped so whatever the operation (blkback).
                if persistent || request.writesGuestPages {
                    writablePages.append((request, index))
                } else {
                    readOnlyPages.append((request, index))
                }
            }
        }
        mapGroup(persistentPages, writable: true, persistentEntries: true)
        mapGroup(writablePages, writable: true, persistentEntries: false)
        mapGroup(readOnlyPages, writable: false, persistentEntries: false)
        for request in requests {
            request.missingPersistent.removeAll(keepingCapacity: true)
            request.missingTransient.removeAll(keepingCapacity: true)
        }
    }

    private func mapGroup(_ group: [(RequestGrants, Int)], writable: Bool, persistentEntries: Bool) {
        let pending = group.filter { $0.0.refusal == nil }
        guard !pending.isEmpty else { return }
        do {
            let region = GrantRegion(try mapper.map(domain: domain, refs: pending.map { $0.0.refs[$0.1] }, writable: writable))
            for (page, (request, index)) in pending.enumerated() {
                request.pages[index] = region.page(page)
                if persistentEntries {
                    entries[request.refs[index]]?.region = region
                    entries[request.refs[index]]?.page = page
                } else {
                    request.transient.append(region)
                }
            }
        } catch {
            let requests = pending.map(\.0)
            if let only = requests.first, requests.allSatisfy({ $0 === only }) {
                only.refusal = .unmappable("\(error)")
                _ = release(only)
                return
            }
            var seen = Set<ObjectIdentifier>()
            for request in requests where seen.insert(ObjectIdentifier(request)).inserted {
                mapGroup(pending.filter { $0.0 === request }, writable: writable, persistentEntries: persistentEntries)
            }
        }
    }

    /// The request is done with its pages: its persistent entries become idle (or go, if
    /// never mapped), its other pages are unmapped. Returns unmap failures, for the log.
    func release(_ request: RequestGrants) -> [any Error] {
        releaseHeld(request)
        budget.give(request.budgeted)
        request.budgeted = 0
        var failures: [any Error] = []
        for region in request.transient {
            do { try region.release() } catch { failures.append(error) }
        }
        request.transient.removeAll(keepingCapacity: true)
        request.missingPersistent.removeAll(keepingCapacity: true)
        request.missingTransient.removeAll(keepingCapacity: true)
        request.copied.removeAll(keepingCapacity: true)
        return failures
    }

    private func releaseHeld(_ request: RequestGrants) {
        // An entry still without a region was reserved by this request and never mapped.
        for ref in request.held {
            if entries[ref]?.region == nil {
                entries[ref] = nil
                budget.give(1)
            } else {
                entries[ref]?.inUse = false
            }
        }
        request.held.removeAll(keepingCapacity: true)
    }

    /// GNTTABOP_copy of copied pages, for requests of this ring.
    func copy(_ direction: GrantCopyDirection, _ segments: [GrantCopySegment]) throws {
        try mapper.copy(domain: domain, direction, segments)
    }

    /// At most every 100 ms: unmaps idle entries unused for 60 s and, when the cache is full,
    /// the least recently used idle 5 % (so a working set larger than the cache still finds
    /// room over time without every request thrashing it). gntdev unmaps what one call mapped
    /// only as a whole, so entries go a mapping at a time, and only a mapping none of whose
    /// entries is in use: what the purge takes is really unmapped, and the domain's grant cap
    /// gets it back. Returns unmap failures.
    func purgeIfDue(now: UInt64) -> [any Error] {
        guard !entries.isEmpty, now &- lastPurge >= Self.purgeIntervalNanoseconds else { return [] }
        lastPurge = now
        // Saturating: a clock read within 60 s of boot expires nothing.
        let expired = { (lastUse: UInt64) in now - min(lastUse, now) >= Self.idleLimitNanoseconds }
        var mappings: [ObjectIdentifier: (region: GrantRegion, refs: [UInt32], lastUse: UInt64, busy: Bool)] = [:]
        for (ref, entry) in entries {
            // An entry without a region is reserved by a request whose batch is not mapped yet.
            guard let region = entry.region else { continue }
            var mapping = mappings[ObjectIdentifier(region)] ?? (region, [], 0, false)
            mapping.refs.append(ref)
            mapping.lastUse = max(mapping.lastUse, entry.lastUse)
            mapping.busy = mapping.busy || entry.inUse
            mappings[ObjectIdentifier(region)] = mapping
        }
        let full = entries.count >= capacity
        let idle = mappings.values.filter { !$0.busy }.sorted { $0.lastUse < $1.lastUse }
        guard full || idle.contains(where: { expired($0.lastUse) }) else { return [] }
        let target = full ? capacity - max(1, capacity * Self.purgePercent / 100) : entries.count
        var failures: [any Error] = []
        for mapping in idle where entries.count > target || expired(mapping.lastUse) {
            for ref in mapping.refs {
                entries[ref] = nil
                do { try mapping.region.release() } catch { failures.append(error) }
            }
            budget.give(mapping.refs.count)
        }
        return failures
    }

    /// Unmaps every persistent entry (the ring is stopping; nothing is in flight).
    func releaseAll() -> [any Error] {
        var failures: [any Error] = []
        for entry in entries.values {
            do { try entry.region?.release() } catch { failures.append(error) }
        }
        budget.give(entries.count)
        entries.removeAll()
        return failures
    }
}
