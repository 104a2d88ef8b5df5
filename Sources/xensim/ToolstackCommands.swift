import ArgumentParser
import Blkif
import Foundation
import Xenbus
import XenSim

struct DomainCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "domain",
        abstract: "Create or destroy a guest domain (what `xl create` / `xl destroy` do to xenstore).",
        subcommands: [Create.self, Destroy.self]
    )

    struct Create: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Create domain N: /local/domain/N and @introduceDomain.")
        @OptionGroup var simulator: SimulatorOptions
        @Option(help: "The new domain's id (1..32751).") var domid: UInt32
        @Option(help: "The guest's memory in MiB.") var memoryMb: Int = 64
        @Option(help: "The domain's name (default: guest<N>).") var name: String?

        func run() throws {
            let store = simulator.connectAsDom0()
            try runToolstack {
                try Toolstack(store: store, hypervisor: simulator.layout).createDomain(domid, name: name ?? "guest\(domid)", memoryMB: memoryMb)
            }
        }
    }

    struct Destroy: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Destroy domain N like `xl destroy`: close its disks, @releaseDomain, remove its tree.")
        @OptionGroup var simulator: SimulatorOptions
        @Option(help: "The domain to destroy.") var domid: UInt32

        func run() throws {
            let store = simulator.connectAsDom0()
            try runToolstack {
                try Toolstack(store: store, hypervisor: simulator.layout, log: toolstackLog).destroyDomain(domid)
            }
        }
    }
}

struct AttachCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "attach",
        abstract: "Attach a disk to a domain like `xl block-attach`; exit 0 once the backend is in InitWait.",
        discussion: "Writes the backend and frontend nodes libxl writes and waits 10 s for the backend. A block-device target also gets the hotplug script's physical-device after InitWait."
    )
    @OptionGroup var simulator: SimulatorOptions
    @Option(help: "The guest domain.") var domid: UInt32
    @Option(help: "The virtual device number (51712 = xvda).") var devid: UInt32
    @Option(help: "The disk: a regular file, a block device, an NBD URI (nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH), or a Ceph RBD image (rbd:POOL/IMAGE[@SNAP][:id=USER][:conf=PATH]).") var target: String
    @Option(help: "w (read-write) or r (read-only).") var mode: String = "w"
    @Option(help: "The backend kind (backend/<kind>/...).") var kind: String = "vbd"
    @Flag(help: "Attach as a CD-ROM (device-type=cdrom, removable).") var cdrom = false

    func validate() throws {
        guard mode == "w" || mode == "r" else { throw ValidationError("--mode must be w or r") }
    }

    func run() throws {
        let store = simulator.connectAsDom0()
        // A path is made absolute, as libxl does; a network target goes in as written.
        let network = self.target.contains("://") || self.target.hasPrefix("rbd:")
        let target = network ? self.target : URL(fileURLWithPath: self.target).standardizedFileURL.path
        try runToolstack {
            try Toolstack(store: store, hypervisor: simulator.layout, log: toolstackLog).attach(.init(
                domid: domid, devid: devid, target: target, writable: mode == "w", kind: kind, cdrom: cdrom))
        }
    }
}

struct DetachCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "detach",
        abstract: "Detach a disk like `xl block-detach`: Closing, wait for Closed, remove both directories."
    )
    @OptionGroup var simulator: SimulatorOptions
    @Option(help: "The guest domain.") var domid: UInt32
    @Option(help: "The virtual device number.") var devid: UInt32
    @Option(help: "The backend kind.") var kind: String = "vbd"

    func run() throws {
        let store = simulator.connectAsDom0()
        try runToolstack {
            try Toolstack(store: store, hypervisor: simulator.layout, log: toolstackLog).detach(domid: domid, devid: devid, kind: kind)
        }
    }
}

/// The toolstack's warnings go to stderr, like libxl's.
let toolstackLog: @Sendable (String) -> Void = { message in
    FileHandle.standardError.write(Data("xensim: \(message)\n".utf8))
}
