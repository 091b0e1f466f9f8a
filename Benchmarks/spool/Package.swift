// swift-tools-version:6.0
// Spool storage benchmark for issue 5: SQLite (WAL, GRDB) as ingest's Spool uses it, versus an
// append-only segment log. A separate package so that it never touches the main build.
import PackageDescription

let package = Package(
    name: "spool-bench",
    dependencies: [
        .package(url: "https://github.com/groue/GRDB.swift.git", from: "7.10.0"),
    ],
    targets: [
        .executableTarget(
            name: "spool-bench",
            dependencies: [.product(name: "GRDB", package: "GRDB.swift")],
            // Support.swift counts fsync/fdatasync: libsqlite3's calls must bind to its definitions.
            linkerSettings: [.unsafeFlags(["-Xlinker", "--export-dynamic-symbol=fdatasync", "-Xlinker", "--export-dynamic-symbol=fsync"])]
        ),
    ],
    swiftLanguageModes: [.v5]  // a single-threaded tool: top-level globals without isolation ceremony
)
