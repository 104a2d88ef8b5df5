import Blkif
import Hypervisor
import SimHypervisor
import Xenbus

/// A guest page granted to the backend.
public struct GrantedPage: Sendable, Equatable {
    public let frame: UInt32
    public let ref: UInt32
}

/// Allocates guest pages and grants them to the backend; takes grants back and frees the
/// pages. A grant the backend still maps (GTF_reading/GTF_writing set) is not ended and its
/// page not reused: it waits in `busy` and is retried later, as blkfront does with grants
/// whose end of foreign access fails.
final class GrantedPages {
    let memory: GuestMemory
    let grants: GuestGrantTable
    private(set) var busy: [GrantedPage] = []

    init(memory: GuestMemory, grants: GuestGrantTable) {
        self.memory = memory
        self.grants = grants
    }

    func pointer(_ page: GrantedPage) -> UnsafeMutableRawPointer { memory.page(page.frame) }

    /// `count` pages, each filled by `fill` before it is granted to `domain`.
    func grant(_ count: Int, to domain: UInt32, readOnly: Bool,
               fill: (Int, UnsafeMutableRawPointer) -> Void = { _, _ in }) throws -> [GrantedPage] {
        try grant(frames: memory.allocatePages(count), to: domain, readOnly: readOnly, fill: fill)
    }

    /// `count` pages at consecutive frames (a multi-page ring is one range of guest memory).
    func grantContiguous(_ count: Int, to domain: UInt32) throws -> [GrantedPage] {
        var aside: [[UInt32]] = []
        defer { aside.forEach(memory.freePages) }
        for _ in 0..<64 {
            let frames = try memory.allocatePages(count)
            if frames.enumerated().allSatisfy({ $0.element == frames[0] &+ UInt32($0.offset) }) {
                return try grant(frames: frames, to: domain, readOnly: false) { _, page in
                    page.initializeMemory(as: UInt8.self, repeating: 0, count: SimLayout.pageSize)
                }
            }
            aside.append(frames)
        }
        throw SimDomainError.outOfMemory(pages: count)
    }

    private func grant(frames: [UInt32], to domain: UInt32, readOnly: Bool,
                       fill: (Int, UnsafeMutableRawPointer) -> Void) throws -> [GrantedPage] {
        var granted: [GrantedPage] = []
        do {
            for (index, frame) in frames.enumerated() {
                fill(index, memory.page(frame))
                granted.append(GrantedPage(frame: frame, ref: try grants.grantAccess(frame: frame, to: domain, readOnly: readOnly)))
            }
        } catch {
            release(granted)
            memory.freePages(Array(frames.dropFirst(granted.count)))
            throw error
        }
        return granted
    }

    /// Ends foreign access and frees the pages; those the backend still maps go to `busy`.
    func release(_ pages: [GrantedPage]) {
        var freed: [UInt32] = []
        for page in pages {
            do {
                try grants.endForeignAccess(page.ref)
                freed.append(page.frame)
            } catch SimDomainError.grantBusy {
                busy.append(page)
            } catch {
                // Not a grant of ours any more (cannot happen unless the table was rewritten):
                // keep the page out of use rather than hand it out twice.
            }
        }
        memory.freePages(freed)
    }

    /// Tries the busy grants again; returns how many are still mapped by the backend.
    @discardableResult
    func retryBusy() -> Int {
        let waiting = busy
        busy = []
        release(waiting)
        return busy.count
    }
}
