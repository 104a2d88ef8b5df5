import Glibc

/// Names the calling thread, as `top -H`, `perf` and /proc show it: what
/// pthread_setname_np does on Linux (Glibc's module does not export it, and Foundation's
/// Thread.name never reaches the kernel). Linux keeps the first 15 bytes.
public func nameCurrentThread(_ name: String) {
    let descriptor = open("/proc/thread-self/comm", O_WRONLY | O_CLOEXEC)
    guard descriptor >= 0 else { return }
    defer { close(descriptor) }
    let bytes = Array(name.utf8.prefix(15))
    _ = bytes.withUnsafeBytes { write(descriptor, $0.baseAddress, $0.count) }
}
