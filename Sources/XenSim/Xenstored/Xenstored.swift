import Blkif
import Hypervisor
import Logging
import SimHypervisor
import Xenbus

/// xenstored's request handling without any I/O: connections are ids, requests go in as
/// `WireMessage`s, replies and watch events come out as deliveries addressed to connections.
/// Semantics follow C xenstored (tools/xenstored): permissions, transactions with
/// generation-based conflict detection, watches filtered by read permission, quotas.
/// Single-threaded by design: the simulator's event loop owns it.
public final class Xenstored {
    /// Per-domain limits; like xenstored they bind unprivileged domains only.
    public struct Limits: Sendable {
        public var maxNodesPerDomain = 1000
        /// Value + child names + permissions of one node (xenstored's ACC_NODESZ).
        public var maxNodeSize = 2048
        public var maxWatchesPerConnection = 128
        public var maxTransactionsPerConnection = 10
        public var maxPermissionsPerNode = 5
        /// Path length below /local/domain/N/ (XENSTORE_REL_PATH_MAX).
        public var maxRelativePathLength = 2048
        public init() {}
    }

    public typealias ConnectionID = Int

    public struct Delivery: Equatable, Sendable {
        public let connection: ConnectionID
        public let message: WireMessage
    }

    /// XENSTORE_ABS_PATH_MAX.
    static let absolutePathMax = 3072
    public static let introduceDomainPath = "@introduceDomain"
    public static let releaseDomainPath = "@releaseDomain"
    private static let privilegedOnly: Set<XenstoreMessageType> =
        [.control, .introduce, .release, .isDomainIntroduced, .resume, .setTarget]

    private struct Watch {
        let path: String
        let token: String
        /// Relative watches report event paths without "/local/domain/N/".
        let prefixLength: Int

        /// A connection's watches are told apart by path and token.
        func isSame(as other: Watch) -> Bool { path == other.path && token == other.token }
    }

    private final class Client {
        let caller: XenstoreCaller
        var watches: [Watch] = []
        var transactions: [UInt32: StoreTransaction] = [:]
        var nextTransactionID: UInt32 = 1
        init(caller: XenstoreCaller) { self.caller = caller }
    }

    public let limits: Limits
    let store = NodeStore()
    private var clients: [ConnectionID: Client] = [:]
    private var nextConnectionID: ConnectionID = 1
    public private(set) var introducedDomains: Set<UInt32> = []
    private var targets: [UInt32: UInt32] = [:]
    private var outbox: [Delivery] = []
    private let logger: Logger

    /// Called for INTRODUCE before the reply is sent: the server opens the guest's socket
    /// here, so the domain can connect as soon as the toolstack sees OK. A throw fails the
    /// request with EIO.
    public var onIntroduce: (UInt32) throws -> Void = { _ in }
    /// Called for RELEASE: the server closes the guest's socket and connections.
    public var onRelease: (UInt32) -> Void = { _ in }

    public init(limits: Limits = Limits(), logger: Logger = Logger(label: "xensim.xenstored")) {
        self.limits = limits
        self.logger = logger
        // The tree xenstored starts with (owned by dom0, no access for others), plus what
        // xen-init-dom0 writes at boot.
        let restricted = [XenStorePermission(domid: 0, access: .none)]
        store.set("/", Node(permissions: restricted))
        for special in [Self.introduceDomainPath, Self.releaseDomainPath] {
            store.set(special, Node(permissions: restricted))
        }
        let view = StoreView(store: store, transaction: nil)
        for (path, value) in [("/tool/xenstored", ""), ("/local/domain/0/domid", "0"),
                              ("/local/domain/0/name", "Domain-0")] {
            try! create(path, value: Array(value.utf8), caller: .dom0, view: view)
        }
    }

    // MARK: connections

    public func connect(_ caller: XenstoreCaller) -> ConnectionID {
        let id = nextConnectionID
        nextConnectionID += 1
        clients[id] = Client(caller: caller)
        return id
    }

    /// Forgets a connection with its watches and open transactions.
    public func disconnect(_ id: ConnectionID) {
        clients[id] = nil
    }

    public func caller(of id: ConnectionID) -> XenstoreCaller? { clients[id]?.caller }

    /// Handles one request; returns everything to send, in order (watch events caused by
    /// the request, its reply, then the first firing of a new watch).
    public func handle(_ message: WireMessage, from id: ConnectionID) -> [Delivery] {
        guard let client = clients[id] else { return [] }
        var after: [Delivery] = []
        let reply: WireMessage
        do {
            let (type, payload) = try dispatch(message, from: id, client, after: &after)
            reply = WireMessage(type, requestID: message.requestID, transactionID: message.transactionID, payload: payload)
        } catch {
            let errno = (error as? XenstoreErrno) ?? .eio
            logger.debug("\(client.caller) \(message.type.map { "\($0)" } ?? "type \(message.rawType)"): \(errno.rawValue)")
            reply = WireMessage(.error, requestID: message.requestID, transactionID: message.transactionID,
                                strings: [errno.rawValue])
        }
        var deliveries = outbox
        outbox.removeAll()
        deliveries.append(Delivery(connection: id, message: reply))
        deliveries.append(contentsOf: after)
        return deliveries
    }

    private static let ok: [UInt8] = Array("OK".utf8) + [0]

    /// One request as its handler sees it: the store is read and written through `view`,
    /// which is the request's transaction if it names one.
    private struct Request {
        let message: WireMessage
        let connection: ConnectionID
        let client: Client
        let transaction: StoreTransaction?
        let view: StoreView
        var caller: XenstoreCaller { client.caller }
    }

    /// What all message types share (type check, privilege check, transaction lookup), then
    /// the type's handler.
    private func dispatch(_ message: WireMessage, from id: ConnectionID, _ client: Client,
                          after: inout [Delivery]) throws -> (XenstoreMessageType, [UInt8]) {
        guard let type = message.type, type != .watchEvent, type != .error else { throw XenstoreErrno.enosys }
        if Self.privilegedOnly.contains(type) && !client.caller.isPrivileged { throw XenstoreErrno.eacces }
        var transaction: StoreTransaction?
        if type != .watch && type != .unwatch && message.transactionID != 0 {
            guard let open = client.transactions[message.transactionID] else { throw XenstoreErrno.enoent }
            transaction = open
        }
        let request = Request(message: message, connection: id, client: client, transaction: transaction,
                              view: StoreView(store: store, transaction: transaction))
        let payload: [UInt8]
        switch type {
        case .read: payload = try doRead(request)
        case .directory: payload = try doDirectory(request)
        case .directoryPart: payload = try doDirectoryPart(request)
        case .getPermissions: payload = try doGetPerms(request)
        case .write: payload = try doWrite(request)
        case .mkdir: payload = try doMkdir(request)
        case .rm: payload = try doRm(request)
        case .setPermissions: payload = try doSetPerms(request)
        case .watch: payload = try doWatch(request, after: &after)
        case .unwatch: payload = try doUnwatch(request)
        case .resetWatches: payload = doResetWatches(request)
        case .transactionStart: payload = try doTransactionStart(request)
        case .transactionEnd: payload = try doTransactionEnd(request)
        case .getDomainPath: payload = try doGetDomainPath(request)
        case .introduce: payload = try doIntroduce(request)
        case .release: payload = try doRelease(request)
        case .isDomainIntroduced: payload = try doIsDomainIntroduced(request)
        case .resume: payload = try doResume(request)
        case .setTarget: payload = try doSetTarget(request)
        case .control: payload = try doControl(request)
        case .watchEvent, .error: throw XenstoreErrno.enosys
        }
        return (type, payload)
    }

    // MARK: handlers, named after C xenstored's do_* functions

    private func doRead(_ request: Request) throws -> [UInt8] {
        try lookupArgument(request.message.singleArgument, need: .read, request).node.value
    }

    private func doDirectory(_ request: Request) throws -> [UInt8] {
        let children = try lookupArgument(request.message.singleArgument, need: .read, request).node.children
        let payload = WireMessage.nulTerminated(children)
        guard payload.count <= WireMessage.maxPayload else { throw XenstoreErrno.e2big }
        return payload
    }

    /// A slice of the child list, for lists too long for one DIRECTORY reply: the node's
    /// generation, then whole names from the byte offset on, then an empty string at the end.
    private func doDirectoryPart(_ request: Request) throws -> [UInt8] {
        let strings = request.message.strings
        guard strings.count == 2 else { throw XenstoreErrno.einval }
        let node = try lookupArgument(strings[0], need: .read, request).node
        let offset = Int(Self.leadingNumber(strings[1]))
        let generation = Array("\(node.generation)".utf8) + [0]
        let children = WireMessage.nulTerminated(node.children)
        // Past the end: the generation and an empty string, which ends libxenstore's loop.
        guard offset < children.count else { return generation + [0] }
        let room = WireMessage.maxPayload - generation.count - 1
        var length = 0
        while true {
            let nameLength = (children[(offset + length)...].firstIndex(of: 0) ?? children.count) - (offset + length)
            guard length + nameLength < room else { break }
            length += nameLength + 1
            if offset + length >= children.count { break }
        }
        var payload = generation
        payload.append(contentsOf: children[offset..<min(offset + length, children.count)])
        if offset + length >= children.count { payload.append(0) }
        return payload
    }

    private func doGetPerms(_ request: Request) throws -> [UInt8] {
        let node = try lookupArgument(request.message.singleArgument, need: .read, request, allowSpecial: true).node
        return WireMessage.nulTerminated(node.permissions.map(\.description))
    }

    private func doWrite(_ request: Request) throws -> [UInt8] {
        let payload = request.message.payload
        guard let nul = payload.firstIndex(of: 0) else { throw XenstoreErrno.einval }
        let path = try canonicalize(Array(payload[..<nul]), for: request.caller)
        let value = Array(payload[(nul + 1)...])
        if let old = try writableNode(path, request) {
            var node = old
            node.value = value
            try checkSize(node, caller: request.caller)
            request.view.write(path, node)
            changed(path, exact: false, before: old, view: request.view)
        } else {
            try create(path, value: value, caller: request.caller, view: request.view)
            changed(path, exact: false, before: nil, view: request.view)
        }
        return Self.ok
    }

    private func doMkdir(_ request: Request) throws -> [UInt8] {
        let path = try canonicalize(request.message.singleArgument, for: request.caller)
        if try writableNode(path, request) == nil {
            try create(path, value: [], caller: request.caller, view: request.view)
            changed(path, exact: false, before: nil, view: request.view)
        }
        return Self.ok
    }

    private func doRm(_ request: Request) throws -> [UInt8] {
        let path = try canonicalize(request.message.singleArgument, for: request.caller)
        guard try writableNode(path, request) != nil else {
            // Removing what is not there is fine, as long as its parent exists.
            guard request.view.read(XenstorePath.parent(of: path)) != nil else { throw XenstoreErrno.enoent }
            return Self.ok
        }
        guard path != "/" else { throw XenstoreErrno.einval }
        remove(path, view: request.view)
        return Self.ok
    }

    private func doSetPerms(_ request: Request) throws -> [UInt8] {
        let caller = request.caller
        let strings = request.message.strings
        guard strings.count >= 2 else { throw XenstoreErrno.einval }
        var permissions: [XenStorePermission] = []
        for text in strings.dropFirst() {
            guard let permission = XenStorePermission(String(decoding: text, as: UTF8.self)) else {
                throw XenstoreErrno.einval
            }
            permissions.append(permission)
        }
        if !caller.isPrivileged && permissions.count > limits.maxPermissionsPerNode { throw XenstoreErrno.enospc }
        let (path, old) = try lookupArgument(strings[0], need: [.write, .owner], request, allowSpecial: true)
        // Guests may not give their nodes away.
        if !caller.isPrivileged && permissions[0].domid != old.owner { throw XenstoreErrno.eperm }
        var node = old
        node.permissions = permissions
        request.view.write(path, node)
        changed(path, exact: false, before: old, view: request.view)
        return Self.ok
    }

    /// Registers a watch; its first firing (for the watched path itself, as in xenstored)
    /// goes into `after`, to be sent after the reply.
    private func doWatch(_ request: Request, after: inout [Delivery]) throws -> [UInt8] {
        let client = request.client
        let watch = try watchArgument(request)
        if client.watches.contains(where: { $0.isSame(as: watch) }) { throw XenstoreErrno.eexist }
        if !request.caller.isPrivileged && client.watches.count >= limits.maxWatchesPerConnection {
            throw XenstoreErrno.e2big
        }
        client.watches.append(watch)
        if let event = event(watch, path: watch.path) {
            after.append(Delivery(connection: request.connection, message: event))
        }
        return Self.ok
    }

    private func doUnwatch(_ request: Request) throws -> [UInt8] {
        let watch = try watchArgument(request)
        guard let index = request.client.watches.firstIndex(where: { $0.isSame(as: watch) }) else {
            throw XenstoreErrno.enoent
        }
        request.client.watches.remove(at: index)
        return Self.ok
    }

    private func doResetWatches(_ request: Request) -> [UInt8] {
        request.client.watches.removeAll()
        request.client.transactions.removeAll()
        return Self.ok
    }

    private func doTransactionStart(_ request: Request) throws -> [UInt8] {
        let client = request.client
        // Transactions do not nest.
        guard request.transaction == nil else { throw XenstoreErrno.ebusy }
        if !request.caller.isPrivileged && client.transactions.count >= limits.maxTransactionsPerConnection {
            throw XenstoreErrno.enospc
        }
        var id = client.nextTransactionID
        while id == 0 || client.transactions[id] != nil { id &+= 1 }
        client.nextTransactionID = id &+ 1
        _ = store.nextGeneration()
        client.transactions[id] = StoreTransaction(id: id)
        return Array("\(id)".utf8) + [0]
    }

    /// "T" commits (EAGAIN on a conflict) and only then fires the transaction's watch events;
    /// "F" discards it. Either way the transaction is gone.
    private func doTransactionEnd(_ request: Request) throws -> [UInt8] {
        guard let argument = request.message.singleArgument,
              argument == [UInt8(ascii: "T")] || argument == [UInt8(ascii: "F")] else { throw XenstoreErrno.einval }
        guard let transaction = request.transaction else { throw XenstoreErrno.enoent }
        request.client.transactions[transaction.id] = nil
        if argument == [UInt8(ascii: "T")] {
            try transaction.commit(to: store)
            for event in transaction.events {
                fire(event.path, exact: event.exact, node: store.node(event.path) ?? event.before, before: event.before)
            }
        }
        return Self.ok
    }

    /// Answers for any domid, introduced or not, as xenstored does.
    private func doGetDomainPath(_ request: Request) throws -> [UInt8] {
        guard let argument = request.message.singleArgument else { throw XenstoreErrno.einval }
        return Array("/local/domain/\(Self.leadingNumber(argument))".utf8) + [0]
    }

    /// Arguments: domid, grant frame, event channel port. Introducing an introduced domain
    /// again is OK and changes nothing.
    private func doIntroduce(_ request: Request) throws -> [UInt8] {
        let strings = request.message.strings
        guard strings.count >= 3, let domid = Self.domid(strings[0]),
              Self.number(strings[1]) != nil, Self.number(strings[2]) != nil else { throw XenstoreErrno.einval }
        guard domid != 0 else { throw XenstoreErrno.einval }
        if !introducedDomains.contains(domid) {
            do { try onIntroduce(domid) } catch {
                logger.error("introduce dom\(domid): \(error)")
                throw XenstoreErrno.eio
            }
            introducedDomains.insert(domid)
            logger.info("introduced dom\(domid)")
            fireSpecial(Self.introduceDomainPath)
        }
        return Self.ok
    }

    private func doRelease(_ request: Request) throws -> [UInt8] {
        let domid = try domidArgument(request)
        guard domid != 0 else { throw XenstoreErrno.einval }
        guard introducedDomains.remove(domid) != nil else { throw XenstoreErrno.enoent }
        targets[domid] = nil
        onRelease(domid)
        logger.info("released dom\(domid)")
        fireSpecial(Self.releaseDomainPath)
        return Self.ok
    }

    private func doIsDomainIntroduced(_ request: Request) throws -> [UInt8] {
        let domid = try domidArgument(request)
        return Array((domid == 0 || introducedDomains.contains(domid) ? "T" : "F").utf8) + [0]
    }

    private func doResume(_ request: Request) throws -> [UInt8] {
        let domid = try domidArgument(request)
        guard introducedDomains.contains(domid) else { throw XenstoreErrno.enoent }
        return Self.ok
    }

    /// Arguments: domid, target. From then on permission entries naming the target count
    /// for the domain too (a device model acting for its guest).
    private func doSetTarget(_ request: Request) throws -> [UInt8] {
        let strings = request.message.strings
        guard strings.count >= 2, let domid = Self.domid(strings[0]), let target = Self.domid(strings[1]) else {
            throw XenstoreErrno.einval
        }
        guard introducedDomains.contains(domid), target == 0 || introducedDomains.contains(target) else {
            throw XenstoreErrno.enoent
        }
        targets[domid] = target
        return Self.ok
    }

    private func doControl(_ request: Request) throws -> [UInt8] {
        let strings = request.message.strings.map { String(decoding: $0, as: UTF8.self) }
        switch strings.first {
        case "print":
            logger.info("control print: \(strings.dropFirst().joined(separator: " "))")
            return Self.ok
        case "check":
            return Self.ok
        case "help":
            return Array("check\nprint <string>\nhelp\n".utf8) + [0]
        default:
            throw XenstoreErrno.einval
        }
    }

    // MARK: arguments

    /// Parses a path argument and returns its node if the caller has `need` on it.
    private func lookupArgument(_ raw: [UInt8]?, need: Rights, _ request: Request,
                                allowSpecial: Bool = false) throws -> (path: String, node: Node) {
        let path = try canonicalize(raw, for: request.caller, allowSpecial: allowSpecial)
        return (path, try lookup(path, need: need, caller: request.caller, view: request.view))
    }

    /// The node the caller may write, or nil if it does not exist (and may be created).
    private func writableNode(_ path: String, _ request: Request) throws -> Node? {
        do {
            return try lookup(path, need: .write, caller: request.caller, view: request.view)
        } catch XenstoreErrno.enoent {
            return nil
        }
    }

    /// WATCH and UNWATCH arguments: path and token.
    private func watchArgument(_ request: Request) throws -> Watch {
        let strings = request.message.strings
        guard strings.count == 2 else { throw XenstoreErrno.einval }
        let (path, prefixLength) = try canonicalizeWatch(strings[0], for: request.caller)
        return Watch(path: path, token: String(decoding: strings[1], as: UTF8.self), prefixLength: prefixLength)
    }

    /// A single argument that must be a real domid.
    private func domidArgument(_ request: Request) throws -> UInt32 {
        guard let argument = request.message.singleArgument, let domid = Self.domid(argument) else {
            throw XenstoreErrno.einval
        }
        return domid
    }

    // MARK: paths

    private static func validCharacter(_ byte: UInt8) -> Bool {
        switch byte {
        case UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "a")...UInt8(ascii: "z"),
             UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "-"), UInt8(ascii: "/"),
             UInt8(ascii: "_"), UInt8(ascii: "@"):
            return true
        default:
            return false
        }
    }

    /// xenstored's canonicalize: checks characters, makes relative paths absolute under the
    /// caller's /local/domain/N, rejects trailing or doubled slashes and over-long paths.
    func canonicalize(_ raw: [UInt8]?, for caller: XenstoreCaller, allowSpecial: Bool = false) throws -> String {
        guard let raw, raw.allSatisfy(Self.validCharacter) else { throw XenstoreErrno.einval }
        let text = String(decoding: raw, as: UTF8.self)
        if text.hasPrefix("@") && !allowSpecial { throw XenstoreErrno.einval }
        let path = text.hasPrefix("/") || text.hasPrefix("@") ? text : caller.domainPath + "/" + text
        guard path == "/" || !path.hasSuffix("/"), !path.contains("//"),
              path.utf8.count <= Self.absolutePathMax else { throw XenstoreErrno.einval }
        if !caller.isPrivileged && Self.lengthBelowDomainPath(path) > limits.maxRelativePathLength {
            throw XenstoreErrno.einval
        }
        return path
    }

    private func canonicalizeWatch(_ raw: [UInt8], for caller: XenstoreCaller) throws -> (String, Int) {
        let path = try canonicalize(raw, for: caller, allowSpecial: true)
        let relative = raw.first != UInt8(ascii: "/") && raw.first != UInt8(ascii: "@")
        return (path, relative ? caller.domainPath.utf8.count + 1 : 0)
    }

    /// Length of the part after "/local/domain/N/", or of the whole path elsewhere.
    private static func lengthBelowDomainPath(_ path: String) -> Int {
        let prefix = "/local/domain/"
        guard path.hasPrefix(prefix) else { return path.utf8.count }
        let rest = path.utf8.dropFirst(prefix.utf8.count)
        let digits = rest.prefix { $0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9") }
        guard !digits.isEmpty, digits.count <= 5, rest.dropFirst(digits.count).first == UInt8(ascii: "/") else {
            return path.utf8.count
        }
        return rest.count - digits.count - 1
    }

    private static func number(_ bytes: [UInt8]) -> UInt64? {
        guard !bytes.isEmpty, bytes.count <= 19 else { return nil }
        return UInt64(String(decoding: bytes, as: UTF8.self))
    }

    private static func domid(_ bytes: [UInt8]) -> UInt32? {
        guard let value = number(bytes).flatMap({ UInt32(exactly: $0) }) else { return nil }
        return DomainID(rawValue: value)?.rawValue
    }

    /// atoi: the leading decimal digits, 0 if none (what xenstored does with these fields).
    private static func leadingNumber(_ bytes: [UInt8]) -> UInt64 {
        var value: UInt64 = 0
        for byte in bytes {
            guard byte >= UInt8(ascii: "0") && byte <= UInt8(ascii: "9"), value < UInt64(UInt32.max) else { break }
            value = value * 10 + UInt64(byte - UInt8(ascii: "0"))
        }
        return value
    }

    // MARK: nodes

    /// The node if the caller has `need` on it. Failing that, ENOENT or EACCES as xenstored's
    /// errno_from_parents decides: a caller who lacks that right on the closest existing
    /// ancestor learns nothing about the node and gets EACCES.
    private func lookup(_ path: String, need: Rights, caller: XenstoreCaller, view: StoreView) throws -> Node {
        let target = targets[caller.domid]
        let failure: XenstoreErrno
        if let node = view.read(path) {
            if caller.rights(on: node.permissions, target: target).isSuperset(of: need) { return node }
            failure = .eacces
        } else {
            failure = .enoent
        }
        var ancestor = path
        while ancestor != "/" {
            ancestor = XenstorePath.parent(of: ancestor)
            if let node = view.read(ancestor) {
                if caller.rights(on: node.permissions, target: target).isDisjoint(with: need) { throw XenstoreErrno.eacces }
                throw failure
            }
        }
        throw XenstoreErrno.eacces
    }

    private func checkSize(_ node: Node, caller: XenstoreCaller) throws {
        if !caller.isPrivileged && node.accountedSize > limits.maxNodeSize { throw XenstoreErrno.enospc }
    }

    /// Creates `path` and its missing ancestors. New nodes copy the permissions of the closest
    /// existing ancestor; a guest becomes the owner of what it creates.
    private func create(_ path: String, value: [UInt8], caller: XenstoreCaller, view: StoreView) throws {
        var missing = [path]
        var existingPath = XenstorePath.parent(of: path)
        while view.read(existingPath) == nil {
            missing.append(existingPath)
            existingPath = XenstorePath.parent(of: existingPath)
        }
        missing.reverse()
        var existing = view.read(existingPath)!
        if !caller.isPrivileged && view.nodeCount(ownedBy: caller.domid) + missing.count > limits.maxNodesPerDomain {
            throw XenstoreErrno.enospc
        }
        var permissions = existing.permissions
        if !caller.isPrivileged { permissions[0].domid = caller.domid }
        existing.children.append(XenstorePath.basename(of: missing[0]))
        try checkSize(existing, caller: caller)
        let leaf = Node(value: value, permissions: permissions)
        try checkSize(leaf, caller: caller)

        view.write(existingPath, existing)
        for (index, nodePath) in missing.enumerated() {
            if index == missing.count - 1 {
                view.write(nodePath, leaf)
            } else {
                view.write(nodePath, Node(children: [XenstorePath.basename(of: missing[index + 1])], permissions: permissions))
            }
        }
    }

    /// Removes a subtree. Watchers of the node and its ancestors hear about the node itself;
    /// watchers of a removed descendant hear about exactly that descendant.
    private func remove(_ path: String, view: StoreView) {
        var removed: [(String, Node)] = []
        var stack = [path]
        while let next = stack.popLast() {
            guard let node = view.read(next) else { continue }
            removed.append((next, node))
            stack.append(contentsOf: node.children.map { XenstorePath.child($0, of: next) })
        }
        for (nodePath, node) in removed.reversed() {
            changed(nodePath, exact: nodePath != path, before: node, view: view)
        }
        for (nodePath, _) in removed { view.write(nodePath, nil) }
        let parentPath = XenstorePath.parent(of: path)
        if var parent = view.read(parentPath) {
            let name = XenstorePath.basename(of: path)
            parent.children.removeAll { $0 == name }
            view.write(parentPath, parent)
        }
    }

    // MARK: watches

    /// A change inside a transaction waits for the commit; otherwise watchers hear now.
    private func changed(_ path: String, exact: Bool, before: Node?, view: StoreView) {
        if let transaction = view.transaction {
            transaction.queue(.init(path: path, exact: exact, before: before))
        } else {
            fire(path, exact: exact, node: store.node(path) ?? before, before: before)
        }
    }

    private func fire(_ path: String, exact: Bool, node: Node?, before: Node?) {
        for id in clients.keys.sorted() {
            let client = clients[id]!
            guard !client.watches.isEmpty, watchPermitted(client.caller, path: path, node: node, before: before) else {
                continue
            }
            for watch in client.watches where exact ? watch.path == path : XenstorePath.isWithin(path, watch.path) {
                if let event = event(watch, path: path) { outbox.append(Delivery(connection: id, message: event)) }
            }
        }
    }

    /// @introduceDomain and @releaseDomain: every watcher allowed to read the node hears.
    private func fireSpecial(_ path: String) {
        fire(path, exact: false, node: store.node(path), before: nil)
    }

    private func event(_ watch: Watch, path: String) -> WireMessage? {
        let eventPath = String(decoding: path.utf8.dropFirst(watch.prefixLength), as: UTF8.self)
        let message = WireMessage(.watchEvent, strings: [eventPath, watch.token])
        return message.payload.count <= WireMessage.maxPayload ? message : nil
    }

    /// xenstored's watch_permitted: the watcher may read the node (before or after the
    /// change) or its parent.
    private func watchPermitted(_ caller: XenstoreCaller, path: String, node: Node?, before: Node?) -> Bool {
        let target = targets[caller.domid]
        if let before, caller.rights(on: before.permissions, target: target).contains(.read) { return true }
        guard let node else { return false }
        if caller.rights(on: node.permissions, target: target).contains(.read) { return true }
        guard let parent = store.node(XenstorePath.parent(of: path)) else { return false }
        return caller.rights(on: parent.permissions, target: target).contains(.read)
    }
}
