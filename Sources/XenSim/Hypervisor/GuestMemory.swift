import Blkif
import Hypervisor
import SimHypervisor
import Synchronization
import Xenbus

/// A guest's own RAM: the domain's memory file mapped shared, plus a page allocator. Frame
/// numbers are what the guest puts in grant entries and what the backend maps.
public final class GuestMemory: @unchecked Sendable {
    private let file: SimSharedFile
    public let pageCount: Int
    private let free: Mutex<[UInt32]>

    public init(directory: String, domid: UInt32) throws {
        let path = SimLayout(directory: directory).memory(domid)
        guard SimDomain.exists(directory: directory, domid: domid) else { throw SimDomainError.noSuchDomain(domid) }
        file = try SimSharedFile(path: path)
        pageCount = file.size / SimLayout.pageSize
        // A stack that hands out low frames first.
        free = Mutex(Array((0..<UInt32(pageCount)).reversed()))
    }

    public func allocatePages(_ count: Int) throws -> [UInt32] {
        try free.withLock { stack in
            guard count >= 0 && count <= stack.count else { throw SimDomainError.outOfMemory(pages: count) }
            let taken = Array(stack.suffix(count).reversed())
            stack.removeLast(count)
            return taken
        }
    }

    public func allocatePage() throws -> UInt32 { try allocatePages(1)[0] }

    public func freePages(_ frames: [UInt32]) {
        free.withLock { $0.append(contentsOf: frames.reversed()) }
    }

    /// The guest's view of `frame`.
    public func page(_ frame: UInt32) -> UnsafeMutableRawPointer {
        precondition(Int(frame) < pageCount, "frame outside guest memory")
        return file.base + Int(frame) * SimLayout.pageSize
    }
}
