// swift-tools-version:6.0
// HTTP front benchmark for issue 7: what ingest's HTTP layer costs per request — Hummingbird (what
// ingest uses) against a plain SwiftNIO HTTP/1 ChannelHandler pipeline — with the same trivial
// handler (read the body, answer 202). A separate package so that it never touches the main build.
import PackageDescription

let package = Package(
    name: "http-bench",
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
        .package(url: "https://github.com/hummingbird-project/hummingbird.git", from: "2.28.1"),
    ],
    targets: [
        .executableTarget(
            name: "http-bench",
            dependencies: [
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "Hummingbird", package: "hummingbird"),
            ]
        ),
    ]
)
