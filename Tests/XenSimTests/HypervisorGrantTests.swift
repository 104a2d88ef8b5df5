import CXenBlkif
import Engine
import Foundation
import Glibc
import SimHypervisor
import Testing
import XenSim

/// Grant mapping between a simulated guest (its own view of its memory and grant table) and
/// the backend's SimGrantMapper, which maps the same file pages independently.
@Suite(.serialized) struct HypervisorGrantTests {
    let dir = SimDirectory()
    let guestDomid: UInt32 = 1

    init() throws {
        try SimDomain.createDomain(directory: dir.path, domid: guestDomid, memoryMB: 4)
    }

    func guest() throws -> (GuestMemory, GuestGrantTable) {
        (try GuestMemory(directory: dir.path, domid: guestDomid), try GuestGrantTable(directory: dir.path, domid: guestDomid))
    }

    var memoryPath: String { SimLayout(directory: dir.path).memory(guestDomid) }

    @Test func grantEntryLayoutIsXens() throws {
        defer { dir.remove() }
        #expect(MemoryLayout<grant_entry_v1_t>.size == SimLayout.grantEntrySize)
        #expect(MemoryLayout<grant_entry_v1_t>.offset(of: \.flags) == 0)
        #expect(MemoryLayout<grant_entry_v1_t>.offset(of: \.domid) == 2)
        #expect(MemoryLayout<grant_entry_v1_t>.offset(of: \.frame) == 4)
        #expect([GrantFlags.permitAccess, GrantFlags.typeMask, GrantFlags.readOnly, GrantFlags.reading, GrantFlags.writing]
            == [1, 3, 4, 8, 16])
        let (_, table) = try guest()
        let ref = try table.grantAccess(frame: 0x1234, to: 0, readOnly: true)
        // Read the file as an array of Xen's struct: what a real hypervisor would see.
        let data = try Data(contentsOf: URL(fileURLWithPath: SimLayout(directory: dir.path).grantTable(guestDomid)))
        let entry = data.withUnsafeBytes { $0.load(fromByteOffset: Int(ref) * 8, as: grant_entry_v1_t.self) }
        #expect(entry.flags == UInt16(GTF_permit_access | GTF_readonly))
        #expect(entry.domid == 0)
        #expect(entry.frame == 0x1234)
        #expect(data.count / 8 == SimLayout.grantEntries)
    }

    @Test func writableMappingSharesGuestPagesInRefOrder() throws {
        defer { dir.remove() }
        let (memory, table) = try guest()
        let frames = try memory.allocatePages(3)
        for (i, frame) in frames.enumerated() { memory.page(frame).storeBytes(of: UInt64(0xA0 + i), as: UInt64.self) }
        let refs = try frames.map { try table.grantAccess(frame: $0, to: 0, readOnly: false) }
        let mapper = SimGrantMapper(directory: dir.path)
        // Out of frame order: page i of the mapping must be refs[i]'s frame.
        let order = [refs[2], refs[0], refs[1]]
        let mapping = try mapper.map(domain: guestDomid, refs: order, writable: true)
        #expect(mapping.pageCount == 3)
        #expect(mapping.page(0).load(as: UInt64.self) == 0xA2)
        #expect(mapping.page(1).load(as: UInt64.self) == 0xA0)
        #expect(mapping.page(2).load(as: UInt64.self) == 0xA1)
        mapping.page(1).storeBytes(of: 0xBEEF, toByteOffset: 100, as: UInt32.self)
        #expect(memory.page(frames[0]).load(fromByteOffset: 100, as: UInt32.self) == 0xBEEF)
        for ref in refs {
            #expect(table.entry(ref).flags == GrantFlags.permitAccess | GrantFlags.reading | GrantFlags.writing)
        }
        try mapping.unmap()
        try mapping.unmap()  // idempotent
        for ref in refs { #expect(table.entry(ref).flags == GrantFlags.permitAccess) }
        // Only the guest's own view remains (kept alive here: Swift may end it at its last use).
        withExtendedLifetime(memory) { #expect(mappingCount(of: memoryPath) == 1) }
    }

    @Test func anotherProcessWritesAreSeenThroughTheMapping() throws {
        defer { dir.remove() }
        let (memory, table) = try guest()
        let frame = try memory.allocatePage()
        let ref = try table.grantAccess(frame: frame, to: 0, readOnly: true)
        let mapping = try SimGrantMapper(directory: dir.path).map(domain: guestDomid, refs: [ref], writable: false)
        defer { try? mapping.unmap() }
        let writer = Process()
        writer.executableURL = URL(fileURLWithPath: "/bin/sh")
        writer.arguments = ["-c", "printf 'written-by-pid-%s' $$ | dd of='\(memoryPath)' bs=4096 seek=\(frame) conv=notrunc status=none"]
        try writer.run()
        writer.waitUntilExit()
        #expect(writer.terminationStatus == 0)
        let text = String(decoding: UnsafeRawBufferPointer(start: mapping.base, count: 32).prefix { $0 != 0 }, as: UTF8.self)
        #expect(text == "written-by-pid-\(writer.processIdentifier)")
    }

    @Test func readOnlyGrantMapsOnlyReadOnly() throws {
        defer { dir.remove() }
        let (memory, table) = try guest()
        let ref = try table.grantAccess(frame: try memory.allocatePage(), to: 0, readOnly: true)
        let mapper = SimGrantMapper(directory: dir.path)
        #expect(throws: HypervisorError.grantRefused(domain: guestDomid, ref: ref,
                                                     reason: "entry is GTF_readonly; it cannot be mapped writable")) {
            _ = try mapper.map(domain: guestDomid, refs: [ref], writable: true)
        }
        #expect(table.entry(ref).flags == GrantFlags.permitAccess | GrantFlags.readOnly)
        let mapping = try mapper.map(domain: guestDomid, refs: [ref], writable: false)
        #expect(table.entry(ref).flags == GrantFlags.permitAccess | GrantFlags.readOnly | GrantFlags.reading)
        try mapping.unmap()
        #expect(table.entry(ref).flags == GrantFlags.permitAccess | GrantFlags.readOnly)
    }

    /// Each of Xen's checks refuses; a good ref earlier in the same request is released again
    /// and nothing stays mapped.
    @Test(arguments: ["wrong domid", "no permit flag", "read-only mapped writable", "ref out of range", "frame out of range"])
    func refusalLeavesNothingBehind(rule: String) throws {
        defer { dir.remove() }
        let (memory, table) = try guest()
        // The guest's view must outlive the mapping counts below.
        defer { withExtendedLifetime(memory) {} }
        let good = try table.grantAccess(frame: try memory.allocatePage(), to: 0, readOnly: false)
        let frame = try memory.allocatePage()
        var bad = try table.grantAccess(frame: frame, to: 0, readOnly: false)
        let expectedReason: String
        switch rule {
        case "wrong domid":
            try table.writeRawEntry(bad, flags: GrantFlags.permitAccess, domid: 5, frame: frame)
            expectedReason = "entry grants domain 5, not domain 0"
        case "no permit flag":
            try table.writeRawEntry(bad, flags: 0, domid: 0, frame: frame)
            expectedReason = "entry is not GTF_permit_access (flags 0x0)"
        case "read-only mapped writable":
            try table.writeRawEntry(bad, flags: GrantFlags.permitAccess | GrantFlags.readOnly, domid: 0, frame: frame)
            expectedReason = "entry is GTF_readonly; it cannot be mapped writable"
        case "ref out of range":
            bad = UInt32(table.entryCount)
            expectedReason = "ref out of range (grant table has \(table.entryCount) entries)"
        default:
            try table.writeRawEntry(bad, flags: GrantFlags.permitAccess, domid: 0, frame: UInt32(memory.pageCount))
            expectedReason = "frame \(memory.pageCount) out of range (domain has \(memory.pageCount) pages)"
        }
        let before = mappingCount(of: memoryPath)
        #expect(throws: HypervisorError.grantRefused(domain: guestDomid, ref: bad, reason: expectedReason)) {
            _ = try SimGrantMapper(directory: dir.path).map(domain: guestDomid, refs: [good, bad], writable: true)
        }
        #expect(mappingCount(of: memoryPath) == before)
        #expect(table.entry(good).flags == GrantFlags.permitAccess)
        if Int(bad) < table.entryCount {
            #expect(table.entry(bad).flags & (GrantFlags.reading | GrantFlags.writing) == 0)
        }
        try table.endForeignAccess(good)  // not pinned: revocable
    }

    @Test func endForeignAccessRefusedWhileMapped() throws {
        defer { dir.remove() }
        let (memory, table) = try guest()
        let ref = try table.grantAccess(frame: try memory.allocatePage(), to: 0, readOnly: false)
        let mapping = try SimGrantMapper(directory: dir.path).map(domain: guestDomid, refs: [ref], writable: true)
        #expect(throws: SimDomainError.grantBusy(ref: ref)) { try table.endForeignAccess(ref) }
        #expect(table.entry(ref).flags & GrantFlags.permitAccess != 0)
        try mapping.unmap()
        try table.endForeignAccess(ref)
        #expect(table.entry(ref).flags == 0)
        // Revoked: the backend can no longer map it.
        #expect(throws: HypervisorError.self) {
            _ = try SimGrantMapper(directory: dir.path).map(domain: guestDomid, refs: [ref], writable: false)
        }
    }

    @Test func pinCountsKeepFlagsUntilTheLastMappingGoes() throws {
        defer { dir.remove() }
        let (memory, table) = try guest()
        let ref = try table.grantAccess(frame: try memory.allocatePage(), to: 0, readOnly: false)
        // Two mappers: like two backend processes, they share the pin counts through the file.
        let writable = try SimGrantMapper(directory: dir.path).map(domain: guestDomid, refs: [ref], writable: true)
        let readOnly = try SimGrantMapper(directory: dir.path).map(domain: guestDomid, refs: [ref, ref], writable: false)
        let all = GrantFlags.permitAccess | GrantFlags.reading | GrantFlags.writing
        #expect(table.entry(ref).flags == all)
        try writable.unmap()
        #expect(table.entry(ref).flags == GrantFlags.permitAccess | GrantFlags.reading)
        #expect(throws: SimDomainError.grantBusy(ref: ref)) { try table.endForeignAccess(ref) }
        try readOnly.unmap()
        #expect(table.entry(ref).flags == GrantFlags.permitAccess)
        try table.endForeignAccess(ref)
    }

    @Test func droppedMappingIsReleased() throws {
        defer { dir.remove() }
        let (memory, table) = try guest()
        let ref = try table.grantAccess(frame: try memory.allocatePage(), to: 0, readOnly: false)
        do {
            _ = try SimGrantMapper(directory: dir.path).map(domain: guestDomid, refs: [ref], writable: true)
        }
        #expect(table.entry(ref).flags == GrantFlags.permitAccess)
    }

    @Test func unknownDomainIsRefused() throws {
        defer { dir.remove() }
        #expect(throws: HypervisorError.self) {
            _ = try SimGrantMapper(directory: dir.path).map(domain: 9, refs: [8], writable: false)
        }
    }

    @Test func domainsAreCreatedOnceAndDestroyedOnce() throws {
        defer { dir.remove() }
        #expect(throws: SimDomainError.domainExists(guestDomid)) {
            try SimDomain.createDomain(directory: dir.path, domid: guestDomid, memoryMB: 4)
        }
        #expect(throws: SimDomainError.invalidDomid(0)) { try SimDomain.createDomain(directory: dir.path, domid: 0, memoryMB: 4) }
        try SimDomain.createDomain(directory: dir.path, domid: 7, memoryMB: 1)
        #expect(SimDomain.list(directory: dir.path) == [1, 7])
        #expect(try GuestMemory(directory: dir.path, domid: 7).pageCount == 256)
        try SimDomain.destroyDomain(directory: dir.path, domid: 7)
        #expect(SimDomain.list(directory: dir.path) == [1])
        #expect(throws: SimDomainError.noSuchDomain(7)) { try SimDomain.destroyDomain(directory: dir.path, domid: 7) }
    }
}
