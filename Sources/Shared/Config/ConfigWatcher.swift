import Foundation
import Logging
import ServiceLifecycle
import UnixSignals

/// Reloads the config file on SIGHUP and when the file changes (polled: works for editors'
/// rename-on-save and for Kubernetes ConfigMap symlink swaps alike). A new config is validated
/// whole before anything uses it; an invalid one is logged with its precise error (file, line,
/// tenant, destination, field) and the running config stays in force.
///
/// Files named by `{file: PATH}` secrets are re-read on every reload, so a rotated secret file
/// takes effect on SIGHUP (or on any change to the config file itself).
public actor ConfigWatcher: Service {
    public struct Status: Sendable, Equatable {
        /// How many configs have been applied (1 = the one loaded at start).
        public var generation = 1
        public var loadedAt = Date()
        /// The last reload error, until a valid config is applied.
        public var lastError: String?
        public var lastErrorAt: Date?
    }

    public let path: String
    let interval: Duration
    let logger: Logger
    let apply: @Sendable (SluiceConfig, _ digest: String) async -> Void
    let observe: @Sendable (_ applied: Bool) -> Void
    private var applied: SluiceConfig
    private var lastContents: Data?
    private var rejectedContents: Data?
    public private(set) var status = Status()
    /// Names the applied file's contents (FNV-1a, hex). Processes that read the same file compare
    /// digests to tell whether one of them has not reloaded yet.
    public private(set) var digest: String

    public init(
        path: String, initial: SluiceConfig, interval: Duration = .seconds(1), logger: Logger,
        apply: @escaping @Sendable (SluiceConfig, _ digest: String) async -> Void,
        observe: @escaping @Sendable (_ applied: Bool) -> Void = { _ in }
    ) {
        self.observe = observe
        self.path = path
        self.applied = initial
        self.interval = interval
        self.logger = logger
        self.apply = apply
        self.lastContents = FileManager.default.contents(atPath: path)
        self.digest = Self.digest(lastContents ?? Data())
    }

    public static func digest(_ data: Data) -> String {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for b in data {
            h ^= UInt64(b)
            h &*= 0x100_0000_01b3
        }
        return String(h, radix: 16)
    }

    public func run() async throws {
        let signals = await UnixSignalsSequence(trapping: .sighup)
        await withTaskGroup(of: Void.self) { group in
            group.addTask {
                for await _ in signals {
                    await self.reload(reason: "SIGHUP", force: true)
                }
            }
            group.addTask {
                while !Task.isCancelled {
                    try? await Task.sleep(for: self.interval)
                    await self.reload(reason: "file changed", force: false)
                }
            }
            try? await gracefulShutdown()
            group.cancelAll()
        }
    }

    private var caughtUp: String?

    /// Another process runs on a config with this digest: if it is not ours, the file may have
    /// changed since our last look, so look now (once per digest seen).
    public func catchUp(to other: String) async {
        guard other != digest, other != caughtUp else { return }
        caughtUp = other
        await reload(reason: "another process runs a newer config", force: false)
    }

    private var inProgress: Task<Bool, Never>?

    /// Reads the file; applies it if it changed (or `force`) and is valid. Returns whether a new
    /// config was applied. Reloads never overlap: a caller that comes while one is being applied
    /// waits for it, so whoever asks "is the file's config in force?" gets a true answer.
    @discardableResult
    public func reload(reason: String, force: Bool) async -> Bool {
        while let running = inProgress { _ = await running.value }
        let task = Task { await self.reloadNow(reason: reason, force: force) }
        inProgress = task
        let applied = await task.value
        inProgress = nil
        return applied
    }

    private func reloadNow(reason: String, force: Bool) async -> Bool {
        let contents = FileManager.default.contents(atPath: path)
        if !force && (contents == lastContents || (contents != nil && contents == rejectedContents)) { return false }
        let config: SluiceConfig
        do {
            config = try SluiceConfig.load(path: path)
        } catch {
            if contents != rejectedContents || force {
                logger.error(
                    "config reload rejected; the running config stays in force",
                    metadata: ["reason": "\(reason)", "error": "\(error)", "config.generation": "\(status.generation)"])
            }
            rejectedContents = contents
            status.lastError = "\(error)"
            status.lastErrorAt = Date()
            observe(false)
            return false
        }
        let newDigest = Self.digest(contents ?? Data())
        rejectedContents = nil
        status.lastError = nil
        status.lastErrorAt = nil
        guard config != applied else {
            lastContents = contents
            digest = newDigest
            if force { logger.info("config reloaded: no change", metadata: ["reason": "\(reason)"]) }
            return false
        }
        applied = config
        status.generation += 1
        status.loadedAt = Date()
        await apply(config, newDigest)
        // Only now is this file's config in force: until here a `catchUp` must not think so.
        lastContents = contents
        digest = newDigest
        observe(true)
        logger.notice(
            "config reloaded",
            metadata: [
                "reason": "\(reason)", "config.generation": "\(status.generation)", "tenants": "\(config.tenants.count)",
            ])
        return true
    }
}
