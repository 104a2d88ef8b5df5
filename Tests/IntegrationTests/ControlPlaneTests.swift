import Foundation
import Testing

/// The control plane end to end: xensim's xenstored and toolstack, blkback-server as a separate
/// process, and a "guest" driving its frontend state by hand through its own xenstore socket.
@Suite(.serialized) struct ControlPlaneTests {
    typealias Rig = DaemonRig
    static let backend = DaemonRig.backend
    static let frontend = DaemonRig.frontend

    @Test func attachReachesInitWaitAndTheGuestDrivesTheStateMachine() throws {
        let rig = try Rig("ctl")
        defer { rig.stop() }
        let attach = try rig.sim.xensim(["attach"], ["--domid", "1", "--devid", "51712", "--target", rig.disk])
        #expect(attach.status == 0, "attach: \(attach.stderr) daemon: \(rig.daemon.output)")
        #expect(try rig.read("\(Self.backend)/state") == "2")
        for feature in ["feature-max-indirect-segments", "max-ring-page-order", "multi-queue-max-queues"] {
            #expect(try rig.read("\(Self.backend)/\(feature)") != nil, "probe feature \(feature) missing")
        }

        // The guest may read the backend but not write it.
        let denied = try rig.sim.xenstore("xenstore-write", ["\(Self.backend)/state", "4"], asDomain: 1)
        #expect(denied.status != 0)
        #expect(try rig.read("\(Self.backend)/state") == "2")

        // Frontend Closing → backend Closing; Closed → Closed; Initialising → InitWait (reconnect).
        func guestWritesState(_ state: Int) throws {
            let result = try rig.sim.xenstore("xenstore-write", ["\(Self.frontend)/state", "\(state)"], asDomain: 1)
            #expect(result.status == 0, "guest write: \(result.stderr)")
        }
        try guestWritesState(5)
        #expect(try rig.waitFor("\(Self.backend)/state", "5"))
        try guestWritesState(6)
        #expect(try rig.waitFor("\(Self.backend)/state", "6"))
        try guestWritesState(1)
        #expect(try rig.waitFor("\(Self.backend)/state", "2"))

        // A state a frontend must never show: the backend reports it like xenbus_dev_fatal.
        try guestWritesState(7)
        #expect(try rig.waitFor("\(Self.backend)/state", "5"))
        #expect(try rig.read("/local/domain/0/error/backend/vbd/1/51712/error")?.contains("saw state 7") == true)
        try guestWritesState(6)
        #expect(try rig.waitFor("\(Self.backend)/state", "6"))
        try guestWritesState(1)
        #expect(try rig.waitFor("\(Self.backend)/state", "2"))

        // xl block-detach while the frontend never connected (it is Initialising): online=0
        // and Closing from the toolstack; nothing is mapped, so the backend answers Closed
        // itself instead of letting the toolstack wait 10 s for a frontend that will not.
        let detach = try rig.sim.xensim(["detach"], ["--domid", "1", "--devid", "51712"], timeout: 60)
        #expect(detach.status == 0, "detach: \(detach.stderr)")
        #expect(!detach.stderr.contains("did not close"), "\(detach.stderr)")
        #expect(try rig.read("\(Self.backend)/state") == nil)
        #expect(try rig.read("\(Self.frontend)/state") == nil)
    }

    @Test func attachOfAMissingFileFailsWithAnErrorNodeAndOtherDevicesKeepWorking() throws {
        let rig = try Rig("ctl-missing")
        defer { rig.stop() }
        let missing = rig.sim.directory.appendingPathComponent("no-such.img").path
        let failed = try rig.sim.xensim(["attach"], ["--domid", "1", "--devid", "51728", "--target", missing])
        #expect(failed.status != 0)
        // The toolstack stopped waiting because the backend gave up, not because time ran out.
        #expect(failed.stderr.contains("unable to add device") && failed.stderr.contains("the backend gave up"),
                "stderr: \(failed.stderr)")
        let error = try rig.read("/local/domain/0/error/backend/vbd/1/51728/error")
        #expect(error?.contains("No such file") == true, "error node: \(error ?? "none")")

        let attach = try rig.sim.xensim(["attach"], ["--domid", "1", "--devid", "51712", "--target", rig.disk])
        #expect(attach.status == 0, "attach: \(attach.stderr)")
        #expect(try rig.read("\(Self.backend)/state") == "2")
        #expect(rig.daemon.isRunning)

        // The toolstack removing the backend dir tears the device down; a fresh attach works.
        #expect(try rig.sim.xenstore("xenstore-rm", [Self.backend]).status == 0)
        #expect(try rig.sim.xenstore("xenstore-rm", [Self.frontend]).status == 0)
        let again = try rig.sim.xensim(["attach"], ["--domid", "1", "--devid", "51712", "--target", rig.disk])
        #expect(again.status == 0, "re-attach: \(again.stderr) daemon: \(rig.daemon.output)")
    }

    @Test func daemonWithoutXenstoreExitsWithOneLine() throws {
        // Hypervisor services are there (the simulator's), xenstored is not where it is told to look.
        let sim = try Simulator("no-xenstored")
        defer { sim.stop() }
        let result = try Harness.run(Harness.executable("blkback-server"), ["--sim", sim.path],
                                     environment: ["XENSTORED_PATH": sim.directory.appendingPathComponent("none.sock").path],
                                     timeout: 20)
        #expect(result.status == 1)
        #expect(result.stderr.split(separator: "\n").count == 1, "stderr: \(result.stderr)")
        #expect(result.stderr.contains("xenstore"))
    }

    @Test(.enabled(if: !FileManager.default.fileExists(atPath: "/dev/xen/gntdev"), "this host has Xen's devices"))
    func daemonWithoutXenDevicesExitsTwoWithOneLine() throws {
        let result = try Harness.run(Harness.executable("blkback-server"), [], timeout: 20)
        #expect(result.status == 2)
        #expect(result.stderr.split(separator: "\n").count == 1, "stderr: \(result.stderr)")
        #expect(result.stderr.contains("/dev/xen/gntdev") && result.stderr.contains("xen-gntdev"))
    }
}
