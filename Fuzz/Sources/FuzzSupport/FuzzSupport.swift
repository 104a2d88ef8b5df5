import CLibFuzzer

/// SwiftPM links an executable with its entry point named `<Target>_main`; a fuzz target
/// defines that (through `@_cdecl`) and hands over to libFuzzer here.
public func runLibFuzzer(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?,
                         _ target: @convention(c) (UnsafePointer<UInt8>?, Int) -> CInt) -> CInt {
    var count = argc
    var arguments = argv
    return LLVMFuzzerRunDriver(&count, &arguments, target)
}

/// A broken invariant: libFuzzer records the input that broke it.
public func check(_ condition: Bool, _ what: @autoclosure () -> String) {
    if !condition { fatalError("fuzz invariant broken: \(what())") }
}
