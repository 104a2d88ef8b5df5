import ArgumentParser
import Xenbus

@main
struct XenSimCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "xensim",
        abstract: "A simulated Xen: xenstored, hypervisor services, toolstack and guests, all under one directory.",
        version: BlkbackVersion.string,
        subcommands: [RunCommand.self, StopCommand.self, DomainCommand.self, AttachCommand.self, DetachCommand.self,
                      FrontendCommand.self, AttackCommand.self]
    )
}
