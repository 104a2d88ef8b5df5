// Hostile guests on the simulated xenstored's socket: the input is the byte stream, framed by
// the wire decoder as the server frames it, each message sent by one of two unprivileged
// guests or (rarely) dom0 by its request id. Every reply must fit the wire protocol, and no
// guest may change a node only dom0 may write.
import FuzzSupport
import Logging
import XenSim

private let quiet = Logger(label: "fuzz", factory: { _ in SwiftLogNoOpLogHandler() })
private let secretPath = "/local/domain/0/secret"

private func request(_ xenstored: Xenstored, _ connection: Xenstored.ConnectionID, _ type: XenstoreMessageType,
                     _ strings: [String]) -> WireMessage? {
    xenstored.handle(WireMessage(type, strings: strings), from: connection).last?.message
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzXenstoredWire(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    guard let data else { return 0 }
    let xenstored = Xenstored(logger: quiet)
    let dom0 = xenstored.connect(.dom0)
    // What a toolstack sets up for two guests: introduced, each owning its home.
    for domid in [5, 6] {
        _ = request(xenstored, dom0, .introduce, ["\(domid)", "0", "1"])
        _ = request(xenstored, dom0, .mkdir, ["/local/domain/\(domid)"])
        _ = request(xenstored, dom0, .setPermissions, ["/local/domain/\(domid)", "n\(domid)"])
    }
    _ = xenstored.handle(WireMessage(.write, payload: Array(secretPath.utf8) + [0] + Array("s".utf8)), from: dom0)
    let guests = [xenstored.connect(.guest(5)), xenstored.connect(.guest(6))]

    var decoder = WireDecoder()
    decoder.append(UnsafeBufferPointer(start: data, count: size))
    var dom0Spoke = false
    while let message = try? decoder.next() {
        let sender: Xenstored.ConnectionID
        if message.requestID & 7 == 7 {
            sender = dom0
            dom0Spoke = true
        } else {
            sender = guests[Int(message.requestID & 1)]
        }
        for delivery in xenstored.handle(message, from: sender) {
            var replies = WireDecoder()
            replies.append(delivery.message.encoded())
            let reparsed = try? replies.next()
            check(reparsed == delivery.message, "a reply that does not frame: \(delivery.message.rawType), \(delivery.message.payload.count) bytes")
        }
    }
    if !dom0Spoke {
        let secret = request(xenstored, dom0, .read, [secretPath])
        check(secret?.type == .read && secret?.payload == Array("s".utf8), "a guest changed \(secretPath)")
        let perms = request(xenstored, dom0, .getPermissions, [secretPath])
        check(perms?.payload == Array("n0".utf8) + [0], "a guest changed the permissions of \(secretPath)")
    }
    return 0
}

@_cdecl("FuzzXenstoredWire_main")
public func main(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> CInt {
    runLibFuzzer(argc, argv, fuzzXenstoredWire)
}
