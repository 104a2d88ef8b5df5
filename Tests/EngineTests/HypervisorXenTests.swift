import Engine
import Glibc
import SimHypervisor
import Testing

/// Real Xen on a machine without Xen: opening must fail with the operator's one-line message.
@Suite(.enabled(if: access("/dev/xen/gntdev", F_OK) != 0 && access("/dev/xen/evtchn", F_OK) != 0,
                "only meaningful where the Xen devices are absent"))
struct HypervisorXenOpenTests {
    @Test func grantDeviceMissing() {
        do {
            _ = try XenGrantMapper()
            Issue.record("xengnttab_open succeeded without /dev/xen/gntdev")
        } catch let error as HypervisorError {
            #expect(error == .deviceUnavailable(device: "/dev/xen/gntdev", errno: ENOENT, module: "xen-gntdev"))
            #expect(error.description == "cannot open /dev/xen/gntdev: No such file or directory; "
                + "load the xen-gntdev module (modprobe xen-gntdev) or run in dom0 under Xen")
        } catch {
            Issue.record("unexpected error \(error)")
        }
    }

    @Test func eventChannelDeviceMissing() {
        do {
            _ = try XenEventChannels()
            Issue.record("xenevtchn_open succeeded without /dev/xen/evtchn")
        } catch let error as HypervisorError {
            #expect(error.description == "cannot open /dev/xen/evtchn: No such file or directory; "
                + "load the xen-evtchn module (modprobe xen-evtchn) or run in dom0 under Xen")
            #expect(!error.description.contains("\n"))
        } catch {
            Issue.record("unexpected error \(error)")
        }
    }

    @Test func servicesWithoutSimulatorUseRealXen() {
        #expect(throws: HypervisorError.deviceUnavailable(device: "/dev/xen/gntdev", errno: ENOENT, module: "xen-gntdev")) {
            _ = try HypervisorServices.xen()
        }
    }

    @Test func simulatorWithoutBrokerSaysWhatToStart() {
        do {
            _ = try HypervisorServices.simulator(directory: "/nonexistent-xensim-dir")
            Issue.record("opened a simulator that does not exist")
        } catch {
            let text = "\(error)"
            #expect(text.hasPrefix("cannot use simulated hypervisor state /nonexistent-xensim-dir/evtchn/dom0.sock"))
            #expect(text.contains("xensim run"))
        }
    }
}
