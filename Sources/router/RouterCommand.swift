import ArgumentParser
import Logging
import NIOPosix
import Observability
import ServiceLifecycle
import Shared

@main
struct RouterCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "router",
        abstract: "Routes accepted batches to each tenant's destinations through the output processes.")

    @OptionGroup var options: CommonOptions

    @Option(help: "Serve Prometheus metrics and /healthz on HOST:PORT (e.g. 127.0.0.1:9101). Off when not given.")
    var metricsListen: String?

    @Flag(help: "Only check the config file: print a summary (or the error) and exit (0 valid, 78 invalid).")
    var check = false

    func run() async throws {
        if check {
            do {
                let config = try SluiceConfig.load(path: options.config)
                print("config: ok (\(options.config))")
                print("tenants: \(config.tenants.count)")
                print("destinations: \(config.tenants.reduce(0) { $0 + $1.destinations.count })")
                print("dev-cluster: \(config.usesDevCluster ? "yes" : "no")")
                print("listen: \(config.ingest.host):\(config.ingest.port)")
                return
            } catch {
                print("config: invalid: \(error)")
                throw ExitCode(CommonOptions.configErrorExitCode)
            }
        }
        let logger = try options.start(process: "router")
        let config = try options.loadConfig(logger: logger)
        let executor = EventLoopTaskExecutor(MultiThreadedEventLoopGroup.singleton.next())
        let core = RouterCore(config: config, logger: logger, loop: executor.loop)
        let watcher = ConfigWatcher(path: options.config, initial: config, logger: logger) { config, _ in
            await core.apply(config)
        } observe: { applied in
            ConfigMetrics.record(applied: applied)
        }
        await core.setRefresh { await watcher.reload(reason: "unknown destination", force: false) }
        let server = FrameServer(
            path: options.routerSocketPath, handler: RouterHandler(core: core, watcher: watcher), executor: executor, logger: logger)
        var services: [ServiceGroupConfiguration.ServiceConfiguration] = [.init(service: server), .init(service: watcher)]
        if let metricsListen {
            services.append(.init(service: try metricsListener(address: metricsListen, process: "router", logger: logger)))
        }
        let group = ServiceGroup(
            configuration: .init(services: services, gracefulShutdownSignals: [.sigterm, .sigint], logger: logger))
        logger.info("router starting", metadata: ["tenants": "\(config.tenants.count)"])
        try await group.run()
    }
}
