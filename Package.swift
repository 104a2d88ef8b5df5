// swift-tools-version:6.0
import PackageDescription

// C libraries are reached through thin system-library modules; their types never leave the
// Swift wrappers in Engine / API / XenSim.
func cLibrary(_ name: String, pkgConfig: String, apt: [String]) -> Target {
    .systemLibrary(name: name, path: "Sources/\(name)", pkgConfig: pkgConfig, providers: [.apt(apt)])
}

let package = Package(
    name: "blkback",
    platforms: [.macOS(.v13)],
    products: [
        .executable(name: "blkback-server", targets: ["BlkbackServer"]),
        .executable(name: "xensim", targets: ["xensim"]),
        .library(name: "Engine", targets: ["Engine"]),
        .library(name: "API", targets: ["API"]),
        .library(name: "XenSim", targets: ["XenSim"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-system", from: "1.8.1"),
    ],
    targets: [
        cLibrary("CXenStore", pkgConfig: "xenstore", apt: ["libxen-dev"]),
        cLibrary("CXenGnttab", pkgConfig: "xengnttab", apt: ["libxen-dev"]),
        cLibrary("CXenEvtchn", pkgConfig: "xenevtchn", apt: ["libxen-dev"]),
        // Header-only: atomics on guest-shared memory and SCM_RIGHTS helpers for the simulator.
        .systemLibrary(name: "CHypervisorShim", path: "Sources/CHypervisorShim"),
        .systemLibrary(name: "CXenBlkif", path: "Sources/CXenBlkif", providers: [.apt(["libxen-dev"])]),
        cLibrary("CMicroHTTPD", pkgConfig: "libmicrohttpd", apt: ["libmicrohttpd-dev"]),
        cLibrary("CJansson", pkgConfig: "jansson", apt: ["libjansson-dev"]),
        cLibrary("CURing", pkgConfig: "liburing", apt: ["liburing-dev"]),
        .target(
            name: "Engine",
            dependencies: [
                "CXenStore", "CXenGnttab", "CXenEvtchn", "CXenBlkif", "CURing", "CHypervisorShim",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "SystemPackage", package: "swift-system"),
            ]
        ),
        .target(
            name: "API",
            dependencies: [
                "Engine", "CMicroHTTPD", "CJansson",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .target(
            name: "XenSim",
            dependencies: [
                "Engine", "CHypervisorShim", "CXenBlkif",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "SystemPackage", package: "swift-system"),
            ]
        ),
        .executableTarget(
            name: "BlkbackServer",
            dependencies: [
                "Engine", "API",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .executableTarget(
            name: "xensim",
            dependencies: [
                "XenSim", "Engine",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .testTarget(name: "EngineTests", dependencies: ["Engine", "CXenBlkif"]),
        .testTarget(name: "XenSimTests", dependencies: ["XenSim", "Engine", "CXenBlkif"]),
        .testTarget(name: "IntegrationTests", dependencies: ["Engine", "XenSim"]),
        .testTarget(name: "APITests", dependencies: ["API", "Engine"]),
    ]
)
