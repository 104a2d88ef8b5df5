import Blkif
import Foundation
import Glibc
import NBD
import RBD
import Xenbus

/// A block device number as physical-device spells it: hex "major:minor" (e.g. "fe:10").
public struct DeviceNumber: Hashable, Sendable, CustomStringConvertible {
    public var major: UInt32
    public var minor: UInt32

    public init(major: UInt32, minor: UInt32) {
        self.major = major
        self.minor = minor
    }

    /// Parses the hotplug script's "%x:%x"; nil for anything else.
    public init?(physicalDevice value: String) {
        let parts = value.trimmingCharacters(in: .whitespacesAndNewlines).split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count == 2, let major = Self.hex(parts[0]), let minor = Self.hex(parts[1]) else { return nil }
        self.init(major: major, minor: minor)
    }

    private static func hex(_ text: Substring) -> UInt32? {
        let digits = text.hasPrefix("0x") || text.hasPrefix("0X") ? text.dropFirst(2) : text
        guard !digits.isEmpty, digits.count <= 8 else { return nil }
        return UInt32(digits, radix: 16)
    }

    /// glibc's dev_t encoding (gnu_dev_makedev / major / minor).
    init(_ raw: dev_t) {
        let value = UInt64(raw)
        major = UInt32(truncatingIfNeeded: ((value >> 8) & 0xfff) | ((value >> 32) & ~UInt64(0xfff)))
        minor = UInt32(truncatingIfNeeded: (value & 0xff) | ((value >> 12) & ~UInt64(0xff)))
    }

    var raw: dev_t {
        let major = UInt64(self.major), minor = UInt64(self.minor)
        return dev_t(((major & 0xfff) << 8) | ((major & ~0xfff) << 32) | (minor & 0xff) | ((minor & ~0xff) << 12))
    }

    /// The physical-device spelling.
    public var description: String { String(major, radix: 16) + ":" + String(minor, radix: 16) }
}

/// Where a VBD's data lives, as the toolstack named it.
public enum BackingSource: Hashable, Sendable, CustomStringConvertible {
    /// physical-device, with physical-device-path as a hint for finding the node.
    case device(DeviceNumber, pathHint: String?)
    /// A path from params (regular file or block device).
    case path(String)
    /// An NBD export, named by the URI libnbd's nbd_connect_uri takes (nbd://HOST[:PORT]/EXPORT,
    /// nbd+unix:///EXPORT?socket=PATH, and their TLS forms nbds://, nbds+unix://).
    case nbd(uri: String)
    /// A Ceph RBD image, named as QEMU names it (rbd:POOL/IMAGE[@SNAP][:id=USER][:conf=PATH]).
    case rbd(RBDImageSpec)

    /// Reads a `params` value: strips the qdisk/libxl prefixes aio:, raw:, file:, phy:; takes
    /// an NBD URI or an RBD image name as it is and expands a bare device name to /dev/NAME like the block hotplug
    /// script. Other formats (vhd:, qcow2:, ...) are not raw images and are refused.
    public static func params(_ value: String) throws(BackingStoreError) -> BackingSource {
        var rest = Substring(value.trimmingCharacters(in: .whitespacesAndNewlines))
        let rawPrefixes = ["aio:", "raw:", "file:", "phy:"]
        while let prefix = rawPrefixes.first(where: { rest.hasPrefix($0) }) { rest = rest.dropFirst(prefix.count) }
        if NBDConnection.isURI(rest) { return .nbd(uri: String(rest)) }
        if rest.hasPrefix(RBDImageSpec.prefix) {
            do { return .rbd(try RBDImageSpec(parsing: rest)) } catch {
                throw BackingStoreError(errno: error.errno, message: error.message)
            }
        }
        if rest.isEmpty { throw BackingStoreError(errno: EINVAL, message: "params '\(value)' names no file or device") }
        if rest.hasPrefix("/") { return .path(String(rest)) }
        if let colon = rest.firstIndex(of: ":") {
            throw BackingStoreError(errno: EINVAL, message: "params '\(value)': format '\(rest[..<colon])' is not a raw image")
        }
        if rest.contains("/") {
            throw BackingStoreError(errno: EINVAL, message: "params '\(value)' is not an absolute path")
        }
        return .path("/dev/" + rest)
    }

    public var description: String {
        switch self {
        case .device(let number, _): "physical-device \(number)"
        case .path(let path): path
        case .nbd(let uri): uri
        case .rbd(let spec): spec.description
        }
    }
}

/// An NBD export as the server described it when the store was opened. Each ring makes its
/// own connection with these facts; the one that learned them is closed.
public struct NBDExport: Sendable {
    public let uri: String
    public let info: NBDExportInfo
}

/// Why a backing store could not be opened: errno plus one line, as the error node takes it.
public typealias BackingStoreError = XenbusFailure

/// An open backing store: a regular file or block device, an NBD export or an RBD image. A descriptor
/// stays open until the last reference goes away, so the data plane can finish in-flight I/O
/// after the control plane has forgotten the device.
public final class BackingStore: Sendable {
    /// Where the data is and how to reach it.
    public enum Medium: Sendable {
        /// A regular file or block device, open at `descriptor`.
        case local(descriptor: Int32)
        case nbd(NBDExport)
        /// Open, with its exclusive lock held when writable, until the store goes away.
        case rbd(RBDImage)
    }

    /// The file or device path, the NBD URI, or the RBD image (without its options).
    public let path: String
    public let medium: Medium
    public let readOnly: Bool
    public let isBlockDevice: Bool
    /// The block device's number (nil for a regular file).
    public let deviceNumber: DeviceNumber?
    /// Size in 512-byte sectors, the unit of every blkif sector number.
    public let sectors: UInt64
    public let logicalSectorSize: UInt32
    public let physicalSectorSize: UInt32

    private init(path: String, medium: Medium, readOnly: Bool, isBlockDevice: Bool, deviceNumber: DeviceNumber?,
                 sectors: UInt64, logicalSectorSize: UInt32, physicalSectorSize: UInt32) {
        self.path = path
        self.medium = medium
        self.readOnly = readOnly
        self.isBlockDevice = isBlockDevice
        self.deviceNumber = deviceNumber
        self.sectors = sectors
        self.logicalSectorSize = logicalSectorSize
        self.physicalSectorSize = physicalSectorSize
    }

    deinit {
        if case .local(let descriptor) = medium { Glibc.close(descriptor) }
    }

    /// The local descriptor; nil for a network store.
    public var descriptor: Int32? {
        if case .local(let descriptor) = medium { return descriptor }
        return nil
    }

    /// The store's lock holder (an RBD image's exclusive lock): this daemon's client.
    public var lockHolder: String? { if case .rbd(let image) = medium { image.lockHolder } else { nil } }
    /// The previous holder whose lock was broken at open.
    public var brokenLock: String? { if case .rbd(let image) = medium { image.brokenLock } else { nil } }

    /// Opens the source read-only or read-write (mode "r" / "w"). physical-device must name a
    /// block device; a params path may be a regular file or a block device; an NBD server or
    /// Ceph cluster must answer within `connectTimeout` seconds. RBD commands that wait on the
    /// cluster longer than `retryTimeout` seconds fail (the NBD rings keep their own count).
    /// `previousLockHolder`: who held the store's lock for the daemon that served this VBD
    /// before (`DataPlane.recordedLockHolder`); a lock it still holds is broken, as that
    /// daemon is gone.
    public static func open(_ source: BackingSource, readOnly: Bool, connectTimeout: Double = 10,
                            retryTimeout: Double = 60, previousLockHolder: String? = nil) throws(BackingStoreError) -> BackingStore {
        switch source {
        case .path(let path):
            return try open(path: path, readOnly: readOnly, expecting: nil)
        case .device(let number, let hint):
            return try openDevice(number, pathHint: hint, readOnly: readOnly)
        case .nbd(let uri):
            return try openNBD(uri, readOnly: readOnly, timeout: connectTimeout)
        case .rbd(let spec):
            return try openRBD(spec, readOnly: readOnly, connectTimeout: connectTimeout, retryTimeout: retryTimeout,
                               previousLockHolder: previousLockHolder)
        }
    }

    /// Opens the image and keeps it open (and locked, when writable) for the VBD's life: its
    /// rings share it. 512-byte sectors; 4 KiB physical sectors, what RADOS writes whole.
    private static func openRBD(_ spec: RBDImageSpec, readOnly: Bool, connectTimeout: Double,
                                retryTimeout: Double, previousLockHolder: String?) throws(BackingStoreError) -> BackingStore {
        let image: RBDImage
        do {
            image = try RBDImage(spec, readOnly: readOnly, connectTimeout: connectTimeout, operationTimeout: retryTimeout,
                                 breakingLockOf: previousLockHolder)
        } catch {
            throw BackingStoreError(errno: error.errno, message: error.message)
        }
        return BackingStore(path: spec.description, medium: .rbd(image), readOnly: readOnly, isBlockDevice: false,
                            deviceNumber: nil, sectors: image.info.size / 512, logicalSectorSize: 512, physicalSectorSize: 4096)
    }

    /// Connects once to learn the export's size, flags and block sizes (the rings connect on
    /// their own later). A server that refuses or does not answer fails the open as a missing
    /// file would.
    private static func openNBD(_ uri: String, readOnly: Bool, timeout: Double) throws(BackingStoreError) -> BackingStore {
        let info: NBDExportInfo
        do {
            let connection = try NBDConnection(name: "blkback-open")
            try connection.connect(uri: uri, timeout: timeout)
            info = try connection.exportInfo()
        } catch {
            throw BackingStoreError(errno: error.errno, message: "NBD export unreachable: \(error.message)")
        }
        if info.readOnly && !readOnly {
            throw BackingStoreError(errno: EROFS, message: "NBD export \(uri) is read-only; attach it with mode r")
        }
        // The server's minimum block size is the disk's logical sector size (at least 512
        // bytes, at most a page); its preferred one the physical sector size.
        let logical = max(512, info.minimumBlockSize)
        guard logical.nonzeroBitCount == 1, logical <= 4096 else {
            throw BackingStoreError(errno: EINVAL, message: "NBD export \(uri) has minimum block size \(info.minimumBlockSize); blkif takes 512 to 4096")
        }
        let preferred = info.preferredBlockSize
        let physical = preferred > logical && preferred.nonzeroBitCount == 1 && preferred <= 65536 ? preferred : logical
        return BackingStore(path: uri, medium: .nbd(NBDExport(uri: uri, info: info)), readOnly: readOnly, isBlockDevice: false,
                            deviceNumber: nil, sectors: info.size / UInt64(logical) * UInt64(logical / 512),
                            logicalSectorSize: logical, physicalSectorSize: physical)
    }

    private static func openDevice(_ number: DeviceNumber, pathHint: String?, readOnly: Bool) throws(BackingStoreError) -> BackingStore {
        for candidate in [sysfsDeviceNode(number), pathHint].compactMap({ $0 }) {
            var info = stat()
            if stat(candidate, &info) == 0, info.st_mode & S_IFMT == S_IFBLK, DeviceNumber(info.st_rdev) == number {
                return try open(path: candidate, readOnly: readOnly, expecting: number)
            }
        }
        return try openPrivateNode(number, readOnly: readOnly)
    }

    /// /sys/dev/block/M:m/uevent names the node udev creates (DEVNAME=vdb → /dev/vdb).
    private static func sysfsDeviceNode(_ number: DeviceNumber) -> String? {
        guard let uevent = try? String(contentsOfFile: "/sys/dev/block/\(number.major):\(number.minor)/uevent", encoding: .utf8)
        else { return nil }
        for line in uevent.split(separator: "\n") where line.hasPrefix("DEVNAME=") {
            let name = line.dropFirst("DEVNAME=".count)
            if !name.isEmpty, !name.contains("..") { return "/dev/" + name }
        }
        return nil
    }

    /// No node in /dev (a container without udev): make one in a private directory, open it,
    /// and remove it again.
    private static func openPrivateNode(_ number: DeviceNumber, readOnly: Bool) throws(BackingStoreError) -> BackingStore {
        var template = Array((NSTemporaryDirectory() + "/blkback-node-XXXXXX").utf8CString)
        guard let directory = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }).map({ String(cString: $0) }) else {
            throw BackingStoreError(errno: Glibc.errno, message: "no device node for block device \(number): cannot create a directory for one: \(String(cString: strerror(Glibc.errno)))")
        }
        defer { rmdir(directory) }
        let node = directory + "/device"
        guard mknod(node, S_IFBLK | 0o600, number.raw) == 0 else {
            let error = Glibc.errno
            throw BackingStoreError(errno: error, message: "no device node for block device \(number) in /sys/dev/block or physical-device-path, and mknod failed: \(String(cString: strerror(error)))")
        }
        defer { unlink(node) }
        return try open(path: node, readOnly: readOnly, expecting: number, name: "block device \(number)")
    }

    /// `name` replaces `path` in the result and messages when the node is only temporary.
    /// A block device's discard support from its queue (sysfs): nil when it takes no discard
    /// (or for a regular file).
    public var discardLimits: (granularity: UInt32, alignment: UInt32)? {
        guard isBlockDevice, let number = deviceNumber else { return nil }
        let base = "/sys/dev/block/\(number.major):\(number.minor)"
        func value(_ name: String) -> UInt64? {
            (try? String(contentsOfFile: "\(base)/\(name)", encoding: .utf8))
                .flatMap { UInt64($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
        }
        guard let maxBytes = value("queue/discard_max_bytes"), maxBytes > 0 else { return nil }
        return (UInt32(clamping: value("queue/discard_granularity") ?? UInt64(logicalSectorSize)),
                UInt32(clamping: value("discard_alignment") ?? 0))
    }

    /// Whether the block device takes secure erase (BLKSECDISCARD), which sysfs does not say.
    /// Probed with a misaligned range: since Linux 5.19 the ioctl answers EOPNOTSUPP for a
    /// device without secure erase before it looks at the range, and EINVAL for one with it,
    /// so the probe never erases anything. Needs the descriptor open for writing.
    public var takesSecureErase: Bool {
        guard isBlockDevice, !readOnly, let descriptor else { return false }
        var range: (UInt64, UInt64) = (1, 0)
        return ioctl(descriptor, Self.secureDiscardRequest, &range) != 0 && Glibc.errno == EINVAL
    }

    /// BLKSECDISCARD, _IO(0x12, 125).
    public static let secureDiscardRequest: UInt = 0x127D
    /// BLKDISCARD, _IO(0x12, 119).
    public static let discardRequest: UInt = 0x1277

    /// The store's size now, in 512-byte sectors, rounded down to its logical sector size (a
    /// file or device that grew or shrank since it was opened).
    public func currentSectors() throws(BackingStoreError) -> UInt64 {
        switch medium {
        case .local: break
        // An NBD export's size is fixed for the life of a connection.
        case .nbd: return sectors
        case .rbd(let image):
            do { return try image.currentSize() / 512 } catch {
                throw BackingStoreError(errno: error.errno, message: error.message)
            }
        }
        guard let descriptor else { return sectors }
        var bytes: UInt64 = 0
        if isBlockDevice {
            guard ioctl(descriptor, 0x8008_1272, &bytes) == 0 else {
                throw BackingStoreError(errno: Glibc.errno, message: "BLKGETSIZE64 failed on \(path)")
            }
        } else {
            var info = stat()
            guard fstat(descriptor, &info) == 0 else {
                throw BackingStoreError(errno: Glibc.errno, message: "cannot stat \(path)")
            }
            bytes = UInt64(info.st_size)
        }
        return bytes / UInt64(logicalSectorSize) * UInt64(logicalSectorSize / 512)
    }

    private static func open(path nodePath: String, readOnly: Bool, expecting number: DeviceNumber?,
                             name: String? = nil) throws(BackingStoreError) -> BackingStore {
        let path = name ?? nodePath
        func failure(_ what: String, _ error: Int32 = Glibc.errno) -> BackingStoreError {
            BackingStoreError(errno: error, message: "\(what) \(path): \(String(cString: strerror(error)))")
        }
        // O_NONBLOCK so that a FIFO swapped in cannot hang the control plane; cleared below.
        let descriptor = Glibc.open(nodePath, (readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC | O_NOCTTY | O_NONBLOCK)
        guard descriptor >= 0 else { throw failure(readOnly ? "cannot open (read-only)" : "cannot open (read-write)") }
        var keep = false
        defer { if !keep { Glibc.close(descriptor) } }

        var info = stat()
        guard fstat(descriptor, &info) == 0 else { throw failure("cannot stat") }
        let flags = fcntl(descriptor, F_GETFL)
        guard flags >= 0, fcntl(descriptor, F_SETFL, flags & ~O_NONBLOCK) == 0 else { throw failure("cannot set blocking mode on") }

        let store: BackingStore
        switch info.st_mode & S_IFMT {
        case S_IFREG where number == nil:
            store = BackingStore(path: path, medium: .local(descriptor: descriptor), readOnly: readOnly, isBlockDevice: false,
                                 deviceNumber: nil, sectors: UInt64(info.st_size) / 512,
                                 logicalSectorSize: 512, physicalSectorSize: 512)
        case S_IFBLK:
            let device = DeviceNumber(info.st_rdev)
            if let number, number != device {
                throw BackingStoreError(errno: ENODEV, message: "\(path) is block device \(device), not \(number)")
            }
            // BLKGETSIZE64, BLKSSZGET, BLKPBSZGET from <linux/fs.h>.
            var bytes: UInt64 = 0
            var logical: Int32 = 0
            var physical: UInt32 = 0
            guard ioctl(descriptor, 0x8008_1272, &bytes) == 0 else { throw failure("BLKGETSIZE64 failed on") }
            guard ioctl(descriptor, 0x1268, &logical) == 0 else { throw failure("BLKSSZGET failed on") }
            guard ioctl(descriptor, 0x127b, &physical) == 0 else { throw failure("BLKPBSZGET failed on") }
            guard logical >= 512, logical.nonzeroBitCount == 1 else {
                throw BackingStoreError(errno: EINVAL, message: "\(path) reports logical sector size \(logical)")
            }
            store = BackingStore(path: path, medium: .local(descriptor: descriptor), readOnly: readOnly, isBlockDevice: true,
                                 deviceNumber: device, sectors: bytes / 512, logicalSectorSize: UInt32(logical),
                                 physicalSectorSize: max(physical, UInt32(logical)))
        default:
            throw BackingStoreError(errno: number == nil ? EINVAL : ENOTBLK,
                                    message: number == nil ? "\(path) is neither a regular file nor a block device"
                                                           : "\(path) is not a block device")
        }
        keep = true
        return store
    }
}
