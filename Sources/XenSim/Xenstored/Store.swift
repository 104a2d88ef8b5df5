import Blkif
import Hypervisor
import SimHypervisor
import Xenbus

/// One xenstore node: a value (binary, usually ASCII), ordered child names, permissions
/// (first entry = owner and everyone's default) and the generation of its last change.
struct Node: Equatable {
    var value: [UInt8] = []
    var children: [String] = []
    var permissions: [XenStorePermission]
    var generation: UInt64 = 0

    var owner: UInt32 { permissions.first?.domid ?? 0 }

    /// What xenstored charges against the node-size quota: value, child list and permissions.
    var accountedSize: Int {
        value.count + children.reduce(0) { $0 + $1.utf8.count + 1 } + permissions.count * 8
    }
}

/// Path arithmetic on canonical absolute paths ("/" or "/a/b").
enum XenstorePath {
    static func parent(of path: String) -> String {
        guard let slash = path.dropFirst().lastIndex(of: "/") else { return "/" }
        return String(path[..<slash])
    }

    static func basename(of path: String) -> String {
        String(path[path.index(after: path.lastIndex(of: "/")!)...])
    }

    static func child(_ name: String, of parent: String) -> String {
        parent == "/" ? "/" + name : parent + "/" + name
    }

    /// xenstored's is_child: `path` is `ancestor` or below it; everything is below "/".
    static func isWithin(_ path: String, _ ancestor: String) -> Bool {
        if ancestor == "/" { return true }
        guard path.hasPrefix(ancestor) else { return false }
        let rest = path.utf8.dropFirst(ancestor.utf8.count)
        return rest.isEmpty || rest.first == UInt8(ascii: "/")
    }
}

/// The committed tree. Every change takes a fresh generation from one counter, which is what
/// transactions compare at commit time.
final class NodeStore {
    private(set) var nodes: [String: Node] = [:]
    private(set) var generation: UInt64 = 0
    private var ownedNodes: [UInt32: Int] = [:]

    func nextGeneration() -> UInt64 {
        generation += 1
        return generation
    }

    func node(_ path: String) -> Node? { nodes[path] }

    /// Stores (or with nil removes) a node exactly as given, keeping per-owner counts.
    func set(_ path: String, _ node: Node?) {
        if let old = nodes[path] { ownedNodes[old.owner, default: 0] -= 1 }
        if let node { ownedNodes[node.owner, default: 0] += 1 }
        nodes[path] = node
    }

    func nodeCount(ownedBy domid: UInt32) -> Int { ownedNodes[domid] ?? 0 }
}

/// An open transaction: a private copy of every node it touched, the generation each had
/// when first touched (nil = absent), and the watch events to fire if it commits.
final class StoreTransaction {
    struct Entry {
        var seenGeneration: UInt64?
        var node: Node?
        var modified = false
    }

    struct QueuedEvent {
        var path: String
        var exact: Bool
        var before: Node?
    }

    let id: UInt32
    private(set) var entries: [String: Entry] = [:]
    private(set) var order: [String] = []
    private(set) var events: [QueuedEvent] = []
    private var ownerDelta: [UInt32: Int] = [:]

    init(id: UInt32) { self.id = id }

    func read(_ path: String, from store: NodeStore) -> Node? {
        if let entry = entries[path] { return entry.node }
        let node = store.node(path)
        entries[path] = Entry(seenGeneration: node?.generation, node: node)
        order.append(path)
        return node
    }

    func write(_ path: String, _ node: Node?, over store: NodeStore) {
        let old = read(path, from: store)
        if let old { ownerDelta[old.owner, default: 0] -= 1 }
        if let node { ownerDelta[node.owner, default: 0] += 1 }
        entries[path]!.node = node
        entries[path]!.modified = true
    }

    func nodeCount(ownedBy domid: UInt32, in store: NodeStore) -> Int {
        store.nodeCount(ownedBy: domid) + (ownerDelta[domid] ?? 0)
    }

    func queue(_ event: QueuedEvent) { events.append(event) }

    /// Applies the transaction if no node it touched changed since (xenstored's
    /// finalize_transaction); EAGAIN otherwise and the store is left as it was.
    func commit(to store: NodeStore) throws(XenstoreErrno) {
        for path in order where store.node(path)?.generation != entries[path]!.seenGeneration {
            throw .eagain
        }
        for path in order {
            guard let entry = entries[path], entry.modified else { continue }
            var node = entry.node
            node?.generation = store.nextGeneration()
            store.set(path, node)
        }
    }
}

/// The tree as one request sees it: the committed store, or a transaction's copy of it.
struct StoreView {
    let store: NodeStore
    let transaction: StoreTransaction?

    func read(_ path: String) -> Node? {
        transaction.map { $0.read(path, from: store) } ?? store.node(path)
    }

    func write(_ path: String, _ node: Node?) {
        var node = node
        node?.generation = store.nextGeneration()
        if let transaction {
            transaction.write(path, node, over: store)
        } else {
            store.set(path, node)
        }
    }

    func nodeCount(ownedBy domid: UInt32) -> Int {
        transaction?.nodeCount(ownedBy: domid, in: store) ?? store.nodeCount(ownedBy: domid)
    }
}
