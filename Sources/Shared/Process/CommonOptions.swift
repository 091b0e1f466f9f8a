import ArgumentParser
import Foundation
import Logging

#if canImport(Glibc)
import Glibc
#endif

extension Logger.Level: @retroactive ExpressibleByArgument {}
extension LogFormat: ExpressibleByArgument {}

/// Options every Sluice executable takes.
public struct CommonOptions: ParsableArguments, Sendable {
    @Option(name: .long, help: "Path of the YAML config file.")
    public var config: String = ProcessInfo.processInfo.environment["SLUICE_CONFIG"] ?? "sluice.yaml"

    @Option(name: .long, help: "Directory for the Unix sockets (created private to this user).")
    public var runDir: String = RunDirectory.defaultPath

    @Option(name: .long, help: "Lowest log level: trace, debug, info, notice, warning, error, critical.")
    public var logLevel: Logger.Level = .info

    @Option(name: .long, help: "Log format: text or json (one object per line).")
    public var logFormat: LogFormat = .text

    @Option(
        name: .long,
        help: """
            CPU scheduling policy for the process's threads: normal, or batch (SCHED_BATCH: a thread that wakes does not \
            preempt the running one; more throughput, slower answers at times). Default: $SLUICE_CPU_SCHEDULING, else \
            the policy the process was started with.
            """)
    public var cpuScheduling: CPUScheduling? = ProcessInfo.processInfo.environment["SLUICE_CPU_SCHEDULING"].flatMap(CPUScheduling.init)

    public init() {}

    public var routerSocketPath: String { (runDir as NSString).appendingPathComponent("router.sock") }

    public func validate() throws {
        // sun_path holds 108 bytes including the terminator.
        if routerSocketPath.utf8.count > 100 {
            throw ValidationError("--run-dir is too long for Unix socket paths (keep it under 90 characters)")
        }
    }

    /// Exit status for a configuration error (sysexits' EX_CONFIG).
    public static let configErrorExitCode: Int32 = 78

    /// Loads the config file; on error logs the precise message and exits with status 78.
    public func loadConfig(logger: Logger) throws -> SluiceConfig {
        do {
            return try SluiceConfig.load(path: config)
        } catch {
            logger.critical("invalid configuration", metadata: ["error": "\(error)"])
            throw ExitCode(Self.configErrorExitCode)
        }
    }

    /// Sets up malloc, the CPU scheduling policy, logging and the run directory; returns the
    /// process logger.
    public func start(process: String) throws -> Logger {
        MallocTuning.apply()
        SluiceLogging.bootstrap(process: process, level: logLevel, format: logFormat)
        let logger = Logger(label: process)
        if let failure = cpuScheduling?.apply() {
            logger.warning("\(failure); going on with the policy it has")
        }
        try RunDirectory.prepare(runDir)
        return logger
    }
}

public enum RunDirectory {
    public static var defaultPath: String {
        if let env = ProcessInfo.processInfo.environment["SLUICE_RUN_DIR"], !env.isEmpty { return env }
        return "/tmp/sluice-\(getuid())"
    }

    public struct Failure: Error, CustomStringConvertible {
        public var description: String
    }

    /// Creates the run directory with mode 0700, or checks that an existing one belongs to this user
    /// and tightens it to 0700.
    public static func prepare(_ path: String) throws {
        if mkdir(path, 0o700) != 0 && errno != EEXIST {
            try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        }
        var info = stat()
        guard stat(path, &info) == 0 else { throw Failure(description: "cannot use run directory \(path)") }
        guard info.st_uid == getuid() else {
            throw Failure(description: "run directory \(path) belongs to another user; refusing to use it")
        }
        if info.st_mode & 0o777 != 0o700 { chmod(path, 0o700) }
    }
}
