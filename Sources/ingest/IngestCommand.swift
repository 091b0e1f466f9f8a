import ArgumentParser
import Foundation
import Logging
import NIOPosix
import Observability
import ServiceLifecycle
import Shared

@main
struct IngestCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ingest",
        abstract: "HTTP front door: accepts mParticle event batches (POST /v2/events, /v2/bulkevents).",
        subcommands: [Serve.self, StatusCommand.self, DeadLettersCommand.self],
        defaultSubcommand: Serve.self)
}

struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Serve HTTP and feed the router (default).")

    @OptionGroup var options: CommonOptions

    @Option(help: "Listen address HOST:PORT (overrides ingest.listen in the config).")
    var listen: String?

    @Option(help: "Directory of the durable spool (default: $SLUICE_SPOOL_DIR or <run-dir>/spool). Use persistent storage in production.")
    var spoolDir: String?

    func run() async throws {
        let logger = try options.start(process: "ingest")
        var config = try options.loadConfig(logger: logger)
        if let listen {
            guard let colon = listen.lastIndex(of: ":"), let port = Int(listen[listen.index(after: colon)...]) else {
                throw ValidationError("--listen must be HOST:PORT")
            }
            config.ingest.host = String(listen[..<colon])
            config.ingest.port = port
        }
        let directory =
            spoolDir ?? ProcessInfo.processInfo.environment["SLUICE_SPOOL_DIR"]
            ?? (options.runDir as NSString).appendingPathComponent("spool")
        let spool = try Spool(
            directory: directory, maxBytes: config.ingest.spoolMaxBytes,
            maxBacklogPerDestination: config.ingest.maxBacklogPerDestination,
            commitDelay: .microseconds(config.ingest.spoolCommitDelayUs), logger: logger)
        logger.info(
            "spool opened",
            metadata: ["spool.path": "\(spool.path)", "spool.batches": "\(spool.count)", "spool.bytes": "\(spool.usedBytes)"])
        let tenants = Tenants(
            config, digest: FileManager.default.contents(atPath: options.config).map(ConfigWatcher.digest))
        // HTTP connections, their handlers and the router connection share one event loop: a
        // request, its spool append's completion and the frames it causes wake no other thread
        // but the spool's writer.
        let executor = EventLoopTaskExecutor(MultiThreadedEventLoopGroup.singleton.next())
        let link = RouterLink(
            spool: spool, tenants: tenants, maxHold: .milliseconds(config.ingest.maxAnswerHoldMs), loop: executor.loop, logger: logger)
        let metrics = IngestMetrics.shared
        Metrics.onScrape {
            metrics.spoolBytes.set(Double(spool.usedBytes))
            metrics.spoolPending.set(Double(spool.backlog.values.reduce(0, +)))
            metrics.routerConnected.set(to: link.isConnected ? 1.0 : 0.0)
        }
        let startup = config
        let watcher = ConfigWatcher(path: options.config, initial: config, logger: logger) { new, digest in
            tenants.update(new, digest: digest)
            link.pump()
            if new.ingest != startup.ingest {
                logger.warning("ingest settings (listen, limits) changed: they take effect at the next restart")
            }
        } observe: { applied in
            ConfigMetrics.record(applied: applied)
        }
        // While ingest is idle, sends what the spool took in from `ingest dead-letters replay` (and
        // whatever a lane left behind).
        let idlePump = Task {
            while !Task.isCancelled {
                try? await Task.sleep(for: .seconds(1))
                link.pump(full: true)
            }
        }
        defer { idlePump.cancel() }
        let client = FrameClient(
            path: options.routerSocketPath, role: .ingest, instance: "ingest-\(ProcessInfo.processInfo.processIdentifier)",
            handler: link, executor: executor, logger: logger)
        let server = IngestServer(
            config: config, tenants: tenants, sink: SpoolingSink(spool: spool, link: link, tenants: tenants, logger: logger),
            loop: executor.loop, logger: logger)
        // Shutdown runs in reverse: HTTP stops accepting, then in-flight deliveries get up to 10 s
        // for their acks, then the router connection closes. What is unanswered stays in the spool.
        let drain = DrainOnShutdown(link: link, bound: .seconds(10), logger: logger)
        let group = ServiceGroup(
            configuration: .init(
                services: [.init(service: client), .init(service: drain), .init(service: watcher), .init(service: server)],
                gracefulShutdownSignals: [.sigterm, .sigint], logger: logger))
        // Child tasks inherit the preference: HTTP handlers and the router link's reader run on
        // the loop their channels use.
        var failure: (any Error)?
        do {
            try await withTaskExecutorPreference(executor) { try await group.run() }
        } catch {
            failure = error
        }
        // What the log holds goes to SQLite now: the next start has less to read back.
        do {
            try spool.close()
        } catch {
            logger.warning("spool: the last apply failed; the next start reads the log back", metadata: ["error": "\(error)"])
        }
        if let failure { throw failure }
    }
}

/// On graceful shutdown, waits (up to `bound`) for the router to answer what it was sent.
struct DrainOnShutdown: Service {
    let link: RouterLink
    let bound: Duration
    let logger: Logger

    func run() async throws {
        try? await gracefulShutdown()
        let deadline = ContinuousClock.now + bound
        while link.inFlight > 0 && link.isConnected && ContinuousClock.now < deadline {
            try? await Task.sleep(for: .milliseconds(20))
        }
        logger.info("ingest stopping", metadata: ["deliveries.unanswered": "\(link.inFlight)"])
    }
}
