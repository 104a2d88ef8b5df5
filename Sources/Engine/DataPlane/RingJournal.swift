import Blkif
import Foundation
import Glibc
import Synchronization

/// What one ring's worker keeps where it outlives the process but not the host (a file
/// under the state directory, /run by default, mapped shared): which ring it serves, the
/// consumer index, and a copy of every request taken and not yet answered in public. The ring
/// cannot say this itself: responses overwrite request slots and completions come out of
/// order. A daemon that takes the ring over after a crash or an upgrade answers from it what
/// its predecessor left unanswered (`Recovery`).
///
/// Layout: a header (magic, version, slot count, the ring's identity as text), the indices
/// (req_cons taken, rsp_prod published, rsp_prod_pvt written) and 2 × ring-size slots. A slot
/// is free, taken (the request's bytes and ring index) or answered (the response index and
/// status, until a push publishes it); twice the ring because an answered slot waits for the
/// push while a new request may already be taken. Only the worker thread writes it, in
/// program order; a crash leaves every store made before it.
final class RingJournal {
    static let magic: UInt64 = 0x314C_4E52_4A4B_4C42  // "BLKJRNL1"
    static let version: UInt32 = 1
    static let identityOffset = 16
    static let identityCapacity = 480
    static let indicesOffset = 512
    static let slotsOffset = 1024
    static let slotSize = 128
    static let requestOffset = 16

    enum SlotState: UInt32 { case free = 0, taken = 1, answered = 2 }

    /// A ring's journal could not be used; the device is then closed the normal way.
    struct Refusal: Error, CustomStringConvertible {
        let description: String
    }

    /// What a predecessor left, checked against the shared ring.
    struct Recovery {
        /// req_cons: requests before it were taken.
        var requestConsumer: RingIndex
        /// rsp_prod as the guest sees it: responses before it were published.
        var responseProducer: RingIndex
        /// Responses written but never published, in response order: to write again. They
        /// keep their slots (already answered) until the next push.
        var unpublished: [(request: BlkifRequest, status: BlkifResponseStatus)]
        /// Requests taken and never answered, in ring order, with the slot that still holds
        /// each: to serve again.
        var unanswered: [(slot: Int, ringIndex: RingIndex, request: BlkifRequest)]
    }

    let path: String
    private let descriptor: Int32
    private let base: UnsafeMutableRawPointer
    private let size: Int
    private let layout: BlkifLayout
    private let slotCount: Int
    private var freeSlots: [Int]
    /// Answered slots that the next push publishes.
    private var answeredSlots: [Int] = []

    /// Opens (`resume`) or creates the journal at `path` for the ring `identity` names, and
    /// locks it: another daemon serving the same ring is refused.
    init(path: String, identity: String, ringSize: UInt32, layout: BlkifLayout) throws {
        self.path = path
        self.layout = layout
        slotCount = Int(ringSize) * 2
        size = Self.slotsOffset + slotCount * Self.slotSize
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0o600)
        guard fd >= 0 else { throw Refusal(description: "cannot open \(path): \(String(cString: strerror(errno)))") }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0 else {
            close(fd)
            throw Refusal(description: "\(path) is locked: another blkback-server serves this ring")
        }
        var info = stat()
        let fresh = fstat(fd, &info) == 0 && info.st_size == 0
        guard ftruncate(fd, off_t(size)) == 0,
              let mapped = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), mapped != MAP_FAILED else {
            let error = String(cString: strerror(errno))
            close(fd)
            throw Refusal(description: "cannot map \(path): \(error)")
        }
        descriptor = fd
        base = mapped
        freeSlots = Array((0..<slotCount).reversed())
        if fresh { start(identity: identity, at: 0) }
    }

    deinit {
        munmap(base, size)
        close(descriptor)  // releases the lock
    }

    /// A new session of the ring from index `start`: nothing taken, nothing answered.
    func start(identity: String, at start: RingIndex) {
        base.initializeMemory(as: UInt8.self, repeating: 0, count: Self.slotsOffset + slotCount * Self.slotSize)
        let text = Array(identity.utf8.prefix(Self.identityCapacity))
        base.storeBytes(of: UInt32(text.count), toByteOffset: 12, as: UInt32.self)
        text.withUnsafeBytes { (base + Self.identityOffset + 4).copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
        storeIndex(0, start)
        storeIndex(1, start)
        storeIndex(2, start)
        base.storeBytes(of: UInt32(slotCount), toByteOffset: 8, as: UInt32.self)
        base.storeBytes(of: Self.version, toByteOffset: Self.identityOffset, as: UInt32.self)
        atomicMemoryFence(ordering: .releasing)
        base.storeBytes(of: Self.magic, as: UInt64.self)
        freeSlots = Array((0..<slotCount).reversed())
        answeredSlots = []
    }

    /// Removes the file: the device closed, nothing is left for a successor.
    func remove() { unlink(path) }

    // MARK: recording (worker thread)

    /// The request was taken from ring index `ringIndex`; returns the slot that holds it.
    func taken(_ request: BlkifRequest, at ringIndex: RingIndex) -> Int {
        // Cannot run out: at most ring-size requests are in flight and ring-size answered.
        let slot = freeSlots.popLast()!
        let entry = slotPointer(slot)
        request.encode(into: entry + Self.requestOffset, layout: layout)
        entry.storeBytes(of: ringIndex, toByteOffset: 4, as: UInt32.self)
        atomicMemoryFence(ordering: .releasing)
        entry.storeBytes(of: SlotState.taken.rawValue, as: UInt32.self)
        atomicMemoryFence(ordering: .releasing)
        storeIndex(0, ringIndex &+ 1)
        return slot
    }

    /// The slot's response was written at response index `responseIndex`.
    func answered(_ slot: Int, at responseIndex: RingIndex, status: BlkifResponseStatus) {
        let entry = slotPointer(slot)
        entry.storeBytes(of: responseIndex, toByteOffset: 8, as: UInt32.self)
        entry.storeBytes(of: Int32(status.rawValue), toByteOffset: 12, as: Int32.self)
        atomicMemoryFence(ordering: .releasing)
        entry.storeBytes(of: SlotState.answered.rawValue, as: UInt32.self)
        atomicMemoryFence(ordering: .releasing)
        storeIndex(2, responseIndex &+ 1)
        answeredSlots.append(slot)
    }

    /// Responses up to `responseProducer` are public (rsp_prod was just written): their
    /// slots are free again.
    func published(_ responseProducer: RingIndex) {
        storeIndex(1, responseProducer)
        atomicMemoryFence(ordering: .releasing)
        for slot in answeredSlots {
            slotPointer(slot).storeBytes(of: SlotState.free.rawValue, as: UInt32.self)
            freeSlots.append(slot)
        }
        answeredSlots.removeAll(keepingCapacity: true)
    }

    // MARK: recovery

    /// Reads what a predecessor left for the ring `identity` names, checked against the
    /// guest's shared ring; throws a Refusal (one line) for anything inconsistent, stale or
    /// for another ring. What is still owed stays recorded in its slot (a crash before it is
    /// served again loses nothing); the other slots become free.
    func recover(identity: String, ring: SharedRing) throws(Refusal) -> Recovery {
        guard base.load(as: UInt64.self) == Self.magic,
              base.load(fromByteOffset: Self.identityOffset, as: UInt32.self) == Self.version else {
            throw Refusal(description: "\(path) holds no journal of this version")
        }
        guard Int(base.load(fromByteOffset: 8, as: UInt32.self)) == slotCount else {
            throw Refusal(description: "\(path) was written for a ring of another size")
        }
        let length = min(Int(base.load(fromByteOffset: 12, as: UInt32.self)), Self.identityCapacity)
        let recorded = String(decoding: UnsafeRawBufferPointer(start: base + Self.identityOffset + 4, count: length), as: UTF8.self)
        guard recorded == identity else {
            throw Refusal(description: "\(path) was written for \(recorded.debugDescription), not \(identity.debugDescription)")
        }
        let consumer = index(0), published = index(1), written = index(2)
        let shown = ring.responseProducer
        // The guest may have seen any push up to what was written, never more or less.
        guard shown &- published <= written &- published, consumer &- written <= ring.size else {
            throw Refusal(description: "\(path): rsp_prod \(shown) is outside \(published)...\(written), or req_cons \(consumer) is impossible")
        }
        var unpublished: [(RingIndex, Int, BlkifRequest, BlkifResponseStatus)] = []
        var unanswered: [(slot: Int, ringIndex: RingIndex, request: BlkifRequest)] = []
        for slot in 0..<slotCount {
            let entry = slotPointer(slot)
            let ringIndex = entry.load(fromByteOffset: 4, as: UInt32.self)
            let request = BlkifRequest(decoding: entry + Self.requestOffset, layout: layout)
            // Owed when taken before req_cons: a request taken but not yet counted in req_cons
            // is taken from the ring again. Not "within the last ring-size": answers come out
            // of order, so one slow request (a flush, a lost network store) stays in flight
            // while any number of later ones are taken and answered.
            let owed = consumer &- ringIndex &- 1 < 1 << 31
            switch SlotState(rawValue: entry.load(as: UInt32.self)) {
            case .taken? where owed:
                unanswered.append((slot, ringIndex, request))
                continue
            case .answered? where owed:
                let responseIndex = entry.load(fromByteOffset: 8, as: UInt32.self)
                if responseIndex &- shown < written &- shown {
                    let status = BlkifResponseStatus(rawValue: Int16(truncatingIfNeeded: entry.load(fromByteOffset: 12, as: Int32.self)))
                    unpublished.append((responseIndex, slot, request, status))
                    continue
                }
            default:
                break
            }
            entry.storeBytes(of: SlotState.free.rawValue, as: UInt32.self)
        }
        unpublished.sort { $0.0 &- shown < $1.0 &- shown }
        guard unpublished.count == Int(written &- shown),
              unpublished.enumerated().allSatisfy({ $0.element.0 == shown &+ UInt32($0.offset) }) else {
            throw Refusal(description: "\(path): the responses written after rsp_prod \(shown) are not all recorded")
        }
        // Every request taken and not answered is recorded, or the guest would wait forever.
        guard unanswered.count == Int(consumer &- written) else {
            throw Refusal(description: "\(path): \(consumer &- written) request(s) taken and unanswered, \(unanswered.count) recorded")
        }
        unanswered.sort { $0.ringIndex &- consumer < $1.ringIndex &- consumer }
        storeIndex(1, shown)
        let held = Set(unanswered.map(\.slot) + unpublished.map(\.1))
        freeSlots = (0..<slotCount).reversed().filter { !held.contains($0) }
        answeredSlots = unpublished.map(\.1)
        return Recovery(requestConsumer: consumer, responseProducer: shown,
                        unpublished: unpublished.map { ($0.2, $0.3) }, unanswered: unanswered)
    }

    // MARK: memory

    private func slotPointer(_ slot: Int) -> UnsafeMutableRawPointer { base + Self.slotsOffset + slot * Self.slotSize }
    private func index(_ which: Int) -> RingIndex { base.load(fromByteOffset: Self.indicesOffset + which * 4, as: UInt32.self) }
    private func storeIndex(_ which: Int, _ value: RingIndex) {
        base.storeBytes(of: value, toByteOffset: Self.indicesOffset + which * 4, as: UInt32.self)
    }
}
