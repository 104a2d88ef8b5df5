// A hostile frontend's xenstore directory: the input is lines of `key=value` (bytes as
// xenstore holds them), read the way the control plane reads a frontend at connect (ring
// description, state, flags). What is accepted must lie within the offered limits and read
// back the same from the keys a frontend would write for it; guest text shown in logs must
// come out printable and bounded.
import Blkif
import FuzzSupport
import Xenbus

private func checkSanitized(_ text: String) {
    let shown = XenbusValue.sanitized(text)
    check(shown.unicodeScalars.allSatisfy { ($0.value >= 0x20 && $0.value < 0x7f) || $0 == "…" }, "unprintable \(shown.debugDescription)")
    // 64 scalars at most, each escaped to at most 10 characters ("\u{10ffff}"), plus "…".
    check(shown.unicodeScalars.count <= 64 * 10 + 1, "sanitized text of \(shown.unicodeScalars.count) characters")
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzXenbusValues(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    guard let data else { return 0 }
    let bytes = UnsafeBufferPointer(start: data, count: size)
    guard let shape = bytes.first else { return 0 }
    let limits = RingLimits(maxQueues: 1 + Int(shape & 7), maxRingPageOrder: Int(shape >> 3) % 5,
                            persistentGrants: shape & 0x80 != 0)
    var keys: [String: String] = [:]
    for line in bytes.dropFirst().split(separator: 0x0a, omittingEmptySubsequences: true) {
        let parts = line.split(separator: 0x3d, maxSplits: 1, omittingEmptySubsequences: false)
        let key = String(decoding: parts[0], as: UTF8.self)
        let value = parts.count > 1 ? String(decoding: parts[1], as: UTF8.self) : ""
        keys[key] = value
        checkSanitized(value)
        _ = XenbusValue.flag(value, default: true)
        if XenbusValue.unsigned(value) != nil {
            // Stricter than sscanf("%u"): digits and blanks only, no sign, no trailing text.
            check(value.utf8.allSatisfy { ($0 >= 0x30 && $0 <= 0x39) || $0 == 0x20 || $0 == 0x09 || $0 == 0x0a }, "\(value.debugDescription) read as a number")
        }
    }

    let state = FrontendStateReading(node: keys["state"])
    if case .garbage(let shown) = state { check(!shown.contains("\n"), "raw newline in \(shown)") }
    _ = state.description

    let description: RingDescription
    do {
        description = try RingDescription.read(limits: limits, keys: keys)
    } catch {
        checkSanitized("\(error)")
        return 0
    }
    check(!description.queues.isEmpty && description.queues.count <= limits.maxQueues, "\(description.queues.count) queues")
    check(description.ringPageOrder <= limits.maxRingPageOrder, "order \(description.ringPageOrder)")
    check(description.queues.allSatisfy { $0.ringRefs.count == 1 << description.ringPageOrder }, "ring-ref count")
    check(!description.persistentGrants || limits.persistentGrants, "persistent grants not offered")
    // The keys talk_to_blkback would write for what was accepted read back the same (a
    // missing protocol is written as the host's ABI, which is what it meant).
    let rewritten = Dictionary(description.keys, uniquingKeysWith: { $1 })
    let reread = try? RingDescription.read(limits: limits, keys: rewritten)
    check(reread.map { $0.queues == description.queues && $0.ringPageOrder == description.ringPageOrder
                       && $0.persistentGrants == description.persistentGrants
                       && $0.protocol.xenstoreValue == description.protocol.xenstoreValue } == true,
          "\(description) re-read as \(String(describing: reread))")
    return 0
}

@_cdecl("FuzzXenbusValues_main")
public func main(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> CInt {
    runLibFuzzer(argc, argv, fuzzXenbusValues)
}
