// swift-tools-version:6.0
import PackageDescription

// libFuzzer targets over the parsers a hostile guest or client reaches (docs/fuzzing.md).
// Built only by scripts/fuzz.sh, with -sanitize=fuzzer,address and -parse-as-library: each
// executable defines LLVMFuzzerTestOneInput and libFuzzer supplies main.
func fuzzTarget(_ name: String, _ dependencies: [Target.Dependency]) -> Target {
    .executableTarget(name: name, dependencies: ["FuzzSupport"] + dependencies, path: "Sources/\(name)")
}

let package = Package(
    name: "blkback-fuzz",
    dependencies: [
        .package(name: "blkback", path: ".."),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
    ],
    targets: [
        .systemLibrary(name: "CLibFuzzer", path: "Sources/CLibFuzzer"),
        .target(name: "FuzzSupport", dependencies: ["CLibFuzzer"]),
        fuzzTarget("FuzzBlkifRing", [.product(name: "Blkif", package: "blkback")]),
        fuzzTarget("FuzzXenbusValues", [.product(name: "Blkif", package: "blkback"), .product(name: "Xenbus", package: "blkback")]),
        fuzzTarget("FuzzXenstoredWire", [.product(name: "XenSim", package: "blkback"), .product(name: "Logging", package: "swift-log")]),
        fuzzTarget("FuzzManagementAPI", [.product(name: "API", package: "blkback"), .product(name: "Engine", package: "blkback")]),
    ]
)
