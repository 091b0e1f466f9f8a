import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// Where the built executables are: next to the test bundle, or `SLUICE_BIN_DIR`.
public enum BuiltProducts {
    public static var directory: URL {
        if let dir = ProcessInfo.processInfo.environment["SLUICE_BIN_DIR"] { return URL(fileURLWithPath: dir) }
        var url = URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath()
        // .build/<triple>/debug/sluicePackageTests.xctest
        while url.pathComponents.count > 1 {
            url.deleteLastPathComponent()
            if FileManager.default.isExecutableFile(atPath: url.appendingPathComponent("ingest").path) { return url }
        }
        return URL(fileURLWithPath: ".build/debug")
    }

    public static func path(_ name: String) -> String { directory.appendingPathComponent(name).path }
}

/// Runs a command to completion and returns its standard output (standard error is kept apart).
@discardableResult
public func runCommand(_ executable: String, _ arguments: [String], timeout: TimeInterval = 60) throws -> (status: Int32, out: String, err: String) {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: executable)
    process.arguments = arguments
    let outPipe = Pipe()
    let errPipe = Pipe()
    process.standardOutput = outPipe
    process.standardError = errPipe
    try process.run()
    // Read both pipes while the process runs so neither fills up.
    let outData = LockedData()
    let errData = LockedData()
    let group = DispatchGroup()
    for (pipe, sink) in [(outPipe, outData), (errPipe, errData)] {
        group.enter()
        DispatchQueue.global().async {
            sink.set(pipe.fileHandleForReading.readDataToEndOfFile())
            group.leave()
        }
    }
    let deadline = Date().addingTimeInterval(timeout)
    while process.isRunning && Date() < deadline { usleep(20_000) }
    if process.isRunning { process.terminate() }
    process.waitUntilExit()
    group.wait()
    return (process.terminationStatus, String(decoding: outData.get(), as: UTF8.self), String(decoding: errData.get(), as: UTF8.self))
}

final class LockedData: @unchecked Sendable {
    private let lock = NSLock()
    private var data = Data()
    func set(_ d: Data) { lock.withLock { data = d } }
    func get() -> Data { lock.withLock { data } }
}

/// Finds an executable on PATH.
public func which(_ name: String) -> String? {
    for dir in (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin").split(separator: ":") {
        let path = "\(dir)/\(name)"
        if FileManager.default.isExecutableFile(atPath: path) { return path }
    }
    return nil
}

/// A private temporary directory with a short path (Unix socket paths hold 108 bytes).
public func makeRunDirectory() throws -> String {
    let path = "/tmp/sl-\(getpid())-\(UInt32.random(in: 0..<UInt32.max))"
    try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
    return path
}

/// Polls `condition` until it holds or `timeout` passes (an upper bound for waiting, never a speed check).
public func eventually(timeout: TimeInterval = 30, _ condition: () throws -> Bool) rethrows -> Bool {
    let deadline = Date().addingTimeInterval(timeout)
    while Date() < deadline {
        if try condition() { return true }
        usleep(50_000)
    }
    return try condition()
}
