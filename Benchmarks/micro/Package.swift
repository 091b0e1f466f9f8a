// swift-tools-version:6.1
// Micro-benchmarks of Sluice's JSON layer, settings application, frames and Keen events, each beside
// a Foundation implementation of the same work on the same input. A package of its own so that the
// main build does not carry ordo-one/benchmark. See README.md.
import PackageDescription

let package = Package(
    name: "sluice-micro",
    platforms: [.macOS(.v14)],
    dependencies: [
        .package(name: "sluice", path: "../.."),
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
        // Only the MallocInterposer trait: the default RuntimeInterposer trait needs a package that
        // is not available here (and ARC counts are not reported without it).
        .package(url: "https://github.com/ordo-one/benchmark", from: "1.38.1", traits: ["MallocInterposer"]),
    ],
    targets: [
        // Inputs (realistic mParticle batches, generated) and the Foundation counterparts.
        .target(
            name: "MicroSupport",
            dependencies: [
                .product(name: "SluiceShared", package: "sluice"),
                .product(name: "NIOCore", package: "swift-nio"),
            ]
        ),
        // The ordo-one/benchmark suite (`swift package benchmark`).
        .executableTarget(
            name: "SluiceMicro",
            dependencies: [
                "MicroSupport",
                .product(name: "SluiceShared", package: "sluice"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "Benchmark", package: "benchmark"),
            ],
            path: "Benchmarks/SluiceMicro",
            plugins: [.plugin(name: "BenchmarkPlugin", package: "benchmark")]
        ),
        // A plain loop over one operation, for valgrind --tool=callgrind.
        .executableTarget(
            name: "ProfileDriver",
            dependencies: [
                "MicroSupport",
                .product(name: "SluiceShared", package: "sluice"),
                .product(name: "NIOCore", package: "swift-nio"),
            ]
        ),
    ]
)
