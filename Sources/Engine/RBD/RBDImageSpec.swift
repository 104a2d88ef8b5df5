import Glibc

/// A Ceph RBD image as QEMU names it: `rbd:POOL/[NAMESPACE/]IMAGE[@SNAP][:KEY=VALUE]...`.
/// `id` is the Ceph user (client.ID), `conf` a ceph.conf to read; any other key is a Ceph
/// option (mon_host, keyring, ...). A backslash escapes the next character, so a value may
/// hold `:` (`mon_host=127.0.0.1\:6789`).
public struct RBDImageSpec: Hashable, Sendable, CustomStringConvertible {
    public var pool: String
    public var namespace: String?
    public var image: String
    public var snapshot: String?
    /// The Ceph user without "client."; nil for librados' default (admin).
    public var user: String?
    /// The ceph.conf to read; nil for librados' search ($CEPH_CONF, /etc/ceph/ceph.conf, ...).
    public var configurationFile: String?
    /// Other options, in the order given, for rados_conf_set.
    public var options: [Option]

    public struct Option: Hashable, Sendable {
        public var key: String
        public var value: String

        public init(key: String, value: String) {
            self.key = key
            self.value = value
        }
    }

    public static let prefix = "rbd:"

    public init(pool: String, namespace: String? = nil, image: String, snapshot: String? = nil,
                user: String? = nil, configurationFile: String? = nil, options: [Option] = []) {
        self.pool = pool
        self.namespace = namespace
        self.image = image
        self.snapshot = snapshot
        self.user = user
        self.configurationFile = configurationFile
        self.options = options
    }

    /// Parses `rbd:...`; throws EINVAL with what is wrong.
    public init(parsing text: some StringProtocol) throws(RBDError) {
        guard text.hasPrefix(Self.prefix) else { throw Self.invalid(text, "does not start with rbd:") }
        let fields = Self.split(text.dropFirst(Self.prefix.count), at: ":")
        var path = Self.split(fields[0], at: "/")
        guard path.count == 2 || path.count == 3 else { throw Self.invalid(text, "names no POOL/IMAGE") }
        let imageAndSnapshot = Self.split(path.removeLast(), at: "@")
        guard imageAndSnapshot.count <= 2 else { throw Self.invalid(text, "has more than one @SNAP") }
        pool = Self.unescaped(path[0])
        namespace = path.count == 2 ? Self.unescaped(path[1]) : nil
        image = Self.unescaped(imageAndSnapshot[0])
        snapshot = imageAndSnapshot.count == 2 ? Self.unescaped(imageAndSnapshot[1]) : nil
        guard !pool.isEmpty, !image.isEmpty, namespace?.isEmpty != true, snapshot?.isEmpty != true else {
            throw Self.invalid(text, "has an empty pool, namespace, image or snapshot name")
        }
        options = []
        for field in fields.dropFirst() {
            let pair = Self.split(field, at: "=")
            guard pair.count == 2, !pair[0].isEmpty else { throw Self.invalid(text, "option '\(Self.unescaped(field))' is not KEY=VALUE") }
            let key = Self.unescaped(pair[0]), value = Self.unescaped(pair[1])
            switch key {
            case "id": user = value
            case "conf": configurationFile = value
            default: options.append(Option(key: key, value: value))
            }
        }
    }

    /// Pool, namespace, image and snapshot, without options (which may hold a key).
    public var description: String {
        Self.prefix + pool + "/" + (namespace.map { $0 + "/" } ?? "") + image + (snapshot.map { "@" + $0 } ?? "")
    }

    private static func invalid(_ text: some StringProtocol, _ why: String) -> RBDError {
        // Only the part before the options: they may carry a secret.
        let shown = split(text, at: ":").prefix(2).joined(separator: ":")
        return RBDError(errno: EINVAL, message: "RBD target '\(shown)' \(why)")
    }

    /// Splits at every `separator` not escaped by a backslash; escapes stay for `unescaped`.
    private static func split(_ text: some StringProtocol, at separator: Character) -> [Substring] {
        let text = Substring(text)
        var parts: [Substring] = []
        var start = text.startIndex
        var index = text.startIndex
        while index < text.endIndex {
            if text[index] == "\\" {
                index = text.index(after: index)
                if index < text.endIndex { index = text.index(after: index) }
                continue
            }
            if text[index] == separator {
                parts.append(text[start..<index])
                start = text.index(after: index)
            }
            index = text.index(after: index)
        }
        parts.append(text[start...])
        return parts
    }

    private static func unescaped(_ text: Substring) -> String {
        var result = ""
        var escaping = false
        for character in text {
            if !escaping && character == "\\" {
                escaping = true
            } else {
                result.append(character)
                escaping = false
            }
        }
        return result
    }
}

/// What librados or librbd reported: a positive errno and one line.
public struct RBDError: Error, CustomStringConvertible, Sendable {
    public let errno: Int32
    public let message: String
    public var description: String { message }

    public init(errno: Int32, message: String) {
        self.errno = errno
        self.message = message
    }

    /// A librados/librbd return value (-errno) as an error.
    init(returned value: some BinaryInteger, _ what: String) {
        let code = Int32(clamping: 0 - Int64(clamping: value))
        self.init(errno: code, message: "\(what): \(String(cString: strerror(code)))")
    }
}
