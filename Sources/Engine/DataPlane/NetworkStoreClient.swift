/// One operation of a request on a network store; its completion carries `tag`, as the
/// request's local I/O would.
struct StoreCommand {
    enum Operation {
        case read(UnsafeMutableRawPointer, count: Int)
        case write(UnsafeRawPointer, count: Int)
        case flush
        case discard(count: UInt64)
    }

    let tag: UInt64
    let operation: Operation
    let offset: UInt64

    /// What a successful completion reports: bytes moved for reads and writes.
    var successResult: Int32 {
        switch operation {
        case .read(_, let count), .write(_, let count): Int32(count)
        case .flush, .discard: 0
        }
    }
}

/// A ring's client of a network store (an NBD connection, an RBD image), driven by the ring
/// worker's thread: it takes a request's commands and hands back their completions.
protocol NetworkStoreClient: AnyObject {
    /// The largest read or write one command carries.
    var maxPayload: Int { get }
    /// Whether the store takes a flush (one that does not keeps no write cache).
    var canFlush: Bool { get }
    /// Sends the command now, or keeps it until the store can take it.
    func submit(_ command: StoreCommand)
    /// Before the worker sleeps: arms whatever the client waits on in `uring`. How long the
    /// worker may sleep before the client has something to do (nil: until an event).
    func prepareToWait(_ uring: IOURing, cancellationTag: UInt64) -> Int?
    /// A poll the client armed in the worker's io_uring fired.
    func pollFired(_ completion: IOURing.Completion)
    /// Takes in what the store already sent, without waiting (between the chunks of a long
    /// copy, so that a server sending the next answer is not held up meanwhile).
    func drain()
    /// Hands over the commands that finished since the last call.
    func reap(_ body: (IOURing.Completion) -> Void)
}
