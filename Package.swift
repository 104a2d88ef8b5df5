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
        .executable(name: "blkbackctl", targets: ["blkbackctl"]),
        .library(name: "Engine", targets: ["Engine"]),
        .library(name: "API", targets: ["API"]),
        .library(name: "XenSim", targets: ["XenSim"]),
        .library(name: "BlkbackClient", targets: ["BlkbackClient"]),
        // For the fuzz targets (Fuzz/Package.swift), which take the codecs apart on their own.
        .library(name: "Blkif", targets: ["Blkif"]),
        .library(name: "Xenbus", targets: ["Xenbus"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-openapi-generator", from: "1.14.3"),
        .package(url: "https://github.com/apple/swift-openapi-runtime", from: "1.13.4"),
        // AsyncHTTPClient streams response bodies on Linux (the URLSession transport buffers
        // them there), which the event stream needs.
        .package(url: "https://github.com/swift-server/swift-openapi-async-http-client", from: "1.5.0"),
        .package(url: "https://github.com/swift-server/async-http-client", from: "1.37.0"),
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
        cLibrary("CNBD", pkgConfig: "libnbd", apt: ["libnbd-dev"]),
        // Ceph ships no pkg-config file for librados/librbd; the module map links them.
        .systemLibrary(name: "CRBD", path: "Sources/CRBD", providers: [.apt(["librbd-dev"])]),
        // Engine: the daemon's xen-blkback, in targets along its seams (docs/architecture.md).
        // The control plane and the data plane never import each other; they meet in
        // VBDInterface. The simulator's hypervisor lives outside Engine, in SimHypervisor.
        .target(name: "Xenbus", dependencies: ["CXenStore"], path: "Sources/Engine/Xenbus"),
        // The ring codec and request validation run per request in DataPlane, another module:
        // full cross-module optimization lets their generics be specialized and inlined there.
        // Measured with scripts/bench.sh 10 (medians of 4-6 runs against the single-module
        // engine): 1M writes at QD8 fell from 2243 to 1917 IOPS without it, 2326 with it.
        .target(
            name: "Blkif", dependencies: ["Xenbus", "CXenBlkif", "CHypervisorShim"], path: "Sources/Engine/Blkif",
            swiftSettings: [.unsafeFlags(["-cross-module-optimization"])]
        ),
        .target(
            name: "Hypervisor",
            dependencies: ["CXenGnttab", "CXenEvtchn"],
            path: "Sources/Engine/Hypervisor"
        ),
        // An NBD server as a backing store, through libnbd.
        .target(name: "NBD", dependencies: ["CNBD"], path: "Sources/Engine/NBD"),
        // A Ceph RBD image as a backing store, through librbd.
        .target(name: "RBD", dependencies: ["CRBD"], path: "Sources/Engine/RBD"),
        .target(name: "VBDInterface", dependencies: ["Blkif", "Xenbus", "NBD", "RBD"], path: "Sources/Engine/VBDInterface"),
        .target(
            name: "ControlPlane",
            dependencies: ["VBDInterface", "Xenbus", "Blkif", .product(name: "Logging", package: "swift-log")],
            path: "Sources/Engine/ControlPlane"
        ),
        // The ring worker's state lives in classes, so every change of it was checked for
        // overlapping access at run time (swift_beginAccess): 7 % of the daemon's CPU per 4k
        // request through NBD (10.9-11.1 us, 10.1-10.4 without). The checks stay in debug builds,
        // where every test runs them.
        .target(
            name: "DataPlane",
            dependencies: ["VBDInterface", "Blkif", "Hypervisor", "NBD", "RBD", "CURing", .product(name: "Logging", package: "swift-log")],
            path: "Sources/Engine/DataPlane",
            swiftSettings: [.unsafeFlags(["-enforce-exclusivity=unchecked"], .when(configuration: .release))]
        ),
        .target(
            name: "Engine",
            dependencies: ["ControlPlane", "DataPlane", "VBDInterface", "Xenbus", "Blkif", "Hypervisor"],
            path: "Sources/Engine/Engine"
        ),
        .target(name: "SimHypervisor", dependencies: ["Hypervisor", "CHypervisorShim", "CXenBlkif"]),
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
                "Xenbus", "Blkif", "Hypervisor", "SimHypervisor", "CHypervisorShim", "CXenBlkif",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .executableTarget(
            name: "BlkbackServer",
            dependencies: [
                "Engine", "SimHypervisor", "API",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // The API's client, generated from openapi.yaml at build time (swift-openapi-generator).
        .target(
            name: "BlkbackClient",
            dependencies: [
                .product(name: "OpenAPIRuntime", package: "swift-openapi-runtime"),
                .product(name: "OpenAPIAsyncHTTPClient", package: "swift-openapi-async-http-client"),
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
            ],
            plugins: [.plugin(name: "OpenAPIGenerator", package: "swift-openapi-generator")]
        ),
        .executableTarget(
            name: "blkbackctl",
            dependencies: [
                "BlkbackClient",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .executableTarget(
            name: "xensim",
            dependencies: [
                "XenSim", "SimHypervisor", "Xenbus", "Blkif",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .testTarget(
            name: "EngineTests",
            dependencies: ["Engine", "Blkif", "ControlPlane", "DataPlane", "VBDInterface", "Xenbus", "Hypervisor", "SimHypervisor", "CXenBlkif", "CURing", "RBD", "NBD"]
        ),
        // What tests of several targets share (they run in one process).
        .target(name: "XenStoreTestSupport", dependencies: ["Xenbus"], path: "Tests/XenStoreTestSupport"),
        .testTarget(
            name: "XenSimTests",
            dependencies: ["XenSim", "Engine", "DataPlane", "SimHypervisor", "CXenBlkif", "CURing", "XenStoreTestSupport"]
        ),
        .testTarget(name: "IntegrationTests", dependencies: ["Xenbus", "XenSim", "XenStoreTestSupport", "BlkbackClient"]),
        .testTarget(
            name: "APITests",
            dependencies: ["API", "Engine", "XenStoreTestSupport", "Blkif", "ControlPlane", "DataPlane", "VBDInterface", "Xenbus", "Hypervisor", "CURing"]
        ),
    ]
)
