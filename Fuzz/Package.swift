// swift-tools-version:6.0
// libFuzzer targets for the code that reads untrusted bytes. Built apart from the main package
// because everything must be compiled with -sanitize=fuzzer. See Fuzz/README.md.
import PackageDescription

let fuzzerFlags: [SwiftSetting] = [.unsafeFlags(["-sanitize=fuzzer,address"])]
let fuzzerLink: [LinkerSetting] = [.unsafeFlags(["-sanitize=fuzzer,address", "-use-ld=lld"])]

let package = Package(
    name: "sluice-fuzz",
    dependencies: [.package(name: "sluice", path: "..")],
    targets: [
        .target(name: "FuzzDriver"),
        .executableTarget(
            name: "FuzzJSON", dependencies: ["FuzzDriver", .product(name: "SluiceShared", package: "sluice")],
            swiftSettings: fuzzerFlags, linkerSettings: fuzzerLink),
        .executableTarget(
            name: "FuzzFrames", dependencies: ["FuzzDriver", .product(name: "SluiceShared", package: "sluice")],
            swiftSettings: fuzzerFlags, linkerSettings: fuzzerLink),
        .executableTarget(
            name: "FuzzBatches", dependencies: ["FuzzDriver", .product(name: "SluiceShared", package: "sluice")],
            swiftSettings: fuzzerFlags, linkerSettings: fuzzerLink),
    ]
)
