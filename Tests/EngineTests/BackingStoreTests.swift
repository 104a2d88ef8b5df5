import Engine
import Foundation
import Glibc
import RBD
import Testing
@testable import VBDInterface

@Suite struct BackingStoreTests {
    /// A temporary file of `bytes` bytes, removed by the caller.
    func temporaryFile(bytes: Int) throws -> String {
        let path = NSTemporaryDirectory() + "/blkback-test-\(UUID().uuidString).img"
        #expect(FileManager.default.createFile(atPath: path, contents: Data(count: bytes)))
        return path
    }

    @Test func regularFileSizeInSectors() throws {
        let path = try temporaryFile(bytes: 1024 * 1024 + 100)
        defer { unlink(path) }
        let store = try BackingStore.open(.path(path), readOnly: false)
        #expect(store.sectors == 2048)
        #expect(store.logicalSectorSize == 512)
        #expect(store.physicalSectorSize == 512)
        #expect(!store.isBlockDevice)
        #expect(!store.readOnly)
        #expect(store.deviceNumber == nil)
        #expect(store.path == path)
        var byte: UInt8 = 0x5a
        #expect(pwrite(try #require(store.descriptor), &byte, 1, 0) == 1)
    }

    @Test func readOnlyOpenRefusesWrites() throws {
        let path = try temporaryFile(bytes: 4096)
        defer { unlink(path) }
        let store = try BackingStore.open(.path(path), readOnly: true)
        #expect(store.readOnly)
        var byte: UInt8 = 1
        #expect(pwrite(try #require(store.descriptor), &byte, 1, 0) == -1)
        #expect(errno == EBADF)
    }

    @Test func missingFileIsAnError() {
        #expect(throws: BackingStoreError.self) { try BackingStore.open(.path("/nonexistent/blkback.img"), readOnly: true) }
        do {
            _ = try BackingStore.open(.path("/nonexistent/blkback.img"), readOnly: true)
        } catch {
            #expect(error.errno == ENOENT)
            #expect(error.message.contains("/nonexistent/blkback.img"))
        }
    }

    @Test func directoryIsRefused() {
        do {
            _ = try BackingStore.open(.path(NSTemporaryDirectory()), readOnly: true)
            Issue.record("a directory was accepted")
        } catch {
            #expect(error.errno == EISDIR || error.errno == EINVAL)
        }
    }

    @Test func physicalDeviceMustBeABlockDevice() throws {
        let path = try temporaryFile(bytes: 4096)
        defer { unlink(path) }
        // Neither a regular file nor a character device with the same number is taken as
        // the node of block device fff:1 (which no driver provides).
        for hint in [path, "/dev/null"] {
            #expect(throws: BackingStoreError.self) {
                try BackingStore.open(.device(DeviceNumber(major: 0xfff, minor: 1), pathHint: hint), readOnly: true)
            }
        }
    }

    @Test(arguments: [
        ("/srv/disk.img", "/srv/disk.img"), ("aio:/srv/disk.img", "/srv/disk.img"), ("raw:/dev/vdb", "/dev/vdb"),
        ("file:/srv/a:b.img", "/srv/a:b.img"), ("phy:/dev/vg/lv", "/dev/vg/lv"), ("aio:raw:/x", "/x"),
        ("vdb", "/dev/vdb"), ("  /padded.img\n", "/padded.img"),
    ])
    func paramsPrefixesAreStripped(params: String, path: String) throws {
        #expect(try BackingSource.params(params) == .path(path))
    }

    @Test(arguments: ["nbd://storage.example:10809/disk1", "nbd+unix:///disk1?socket=/run/nbd.sock", "nbds://10.0.0.2/vm7",
                      "nbds+unix:///?socket=/run/nbd.sock&tls-psk-file=/etc/nbd/psk"])
    func nbdURIsAreTakenAsTheyAre(params: String) throws {
        #expect(try BackingSource.params("  \(params)\n") == .nbd(uri: params))
        #expect(try BackingSource.params("raw:" + params) == .nbd(uri: params), "libxl's FORMAT:TARGET")
    }

    /// Nothing listens there: the open fails within its timeout with errno and one line, as a
    /// missing file does.
    @Test func unreachableNBDServerIsAnError() throws {
        let socket = NSTemporaryDirectory() + "/blkback-test-\(UUID().uuidString).sock"
        do {
            _ = try BackingStore.open(.nbd(uri: "nbd+unix:///?socket=\(socket)"), readOnly: false, connectTimeout: 5)
            Issue.record("opened an NBD export nobody serves")
        } catch {
            #expect(error.errno == ENOENT || error.errno == ECONNREFUSED, "\(error)")
            #expect(error.message.contains("NBD export unreachable") && !error.message.contains("\n"), "\(error.message)")
        }
    }

    @Test func rbdImagesAreNamedAsQEMUNamesThem() throws {
        #expect(try BackingSource.params("rbd:vms/disk1") == .rbd(RBDImageSpec(pool: "vms", image: "disk1")))
        #expect(try BackingSource.params("raw:rbd:vms/team-a/disk1@monday:id=xen:conf=/etc/ceph/other.conf")
                == .rbd(RBDImageSpec(pool: "vms", namespace: "team-a", image: "disk1", snapshot: "monday",
                                     user: "xen", configurationFile: "/etc/ceph/other.conf")))
        let spec = try RBDImageSpec(parsing: #"rbd:vms/disk1:mon_host=127.0.0.1\:3300:keyring=/k"#)
        #expect(spec.options == [.init(key: "mon_host", value: "127.0.0.1:3300"), .init(key: "keyring", value: "/k")])
        #expect(spec.description == "rbd:vms/disk1", "options (which may hold a key) stay out of names and messages")
    }

    @Test(arguments: ["rbd:", "rbd:vms", "rbd:/disk1", "rbd:vms/", "rbd:vms/disk1@", "rbd:vms/disk1@a@b",
                      "rbd:a/b/c/d", "rbd:vms/disk1:id", "rbd:vms/disk1:=x", "rbd:vms/disk1:key=SECRET:bogus"])
    func malformedRBDNamesAreRefused(params: String) {
        do {
            _ = try BackingSource.params(params)
            Issue.record("took \(params)")
        } catch {
            #expect(error.errno == EINVAL && !error.message.contains("SECRET"), "\(error.message)")
        }
    }

    /// No monitor answers there: the open fails once the connect timeout is over, with one line.
    @Test func unreachableCephClusterIsAnError() throws {
        do throws(BackingStoreError) {
            _ = try BackingStore.open(.rbd(RBDImageSpec(pool: "p", image: "i", options: [.init(key: "mon_host", value: "127.0.0.1:9")])),
                                      readOnly: false, connectTimeout: 2)
            Issue.record("opened an image on a cluster that is not there")
        } catch {
            #expect(error.errno != 0 && error.message.contains("connecting to the Ceph cluster") && !error.message.contains("\n"),
                    "\(error.message)")
        }
    }

    @Test(arguments: ["", "aio:", "vhd:/srv/disk.vhd", "qcow2:/x.qcow2", "relative/disk.img"])
    func unusableParamsAreRefused(params: String) {
        #expect(throws: BackingStoreError.self) { try BackingSource.params(params) }
    }

    @Test func physicalDeviceParsing() {
        #expect(DeviceNumber(physicalDevice: "fe:10") == DeviceNumber(major: 0xfe, minor: 0x10))
        #expect(DeviceNumber(physicalDevice: "8:0\n") == DeviceNumber(major: 8, minor: 0))
        #expect(DeviceNumber(physicalDevice: "103:100000") == DeviceNumber(major: 0x103, minor: 0x100000))
        for bad in ["", "fe", "fe:", ":10", "fe:10:1", "zz:1", "1:-1", "123456789:0", "fe 10"] {
            #expect(DeviceNumber(physicalDevice: bad) == nil, "\(bad)")
        }
        #expect(DeviceNumber(major: 0xfe, minor: 0x10).description == "fe:10")
    }

    @Test func deviceNumberEncodingMatchesTheKernel() throws {
        var info = stat()
        #expect(stat("/dev/null", &info) == 0)
        #expect(DeviceNumber(info.st_rdev) == DeviceNumber(major: 1, minor: 3))
        let large = DeviceNumber(major: 0x1234, minor: 0x54321)
        #expect(DeviceNumber(large.raw) == large)
    }
}
