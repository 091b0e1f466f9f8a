import ArgumentParser
import Logging
import ServiceLifecycle
import Shared

@main
struct RouterCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "router",
        abstract: "Routes accepted batches to each tenant's destinations through the output processes.")

    @OptionGroup var options: CommonOptions

    func run() async throws {
        let logger = try options.start(process: "router")
        let config: SluiceConfig
        do {
            config = try SluiceConfig.load(path: options.config)
        } catch {
            logger.critical("invalid configuration", metadata: ["error": "\(error)"])
            throw ExitCode(78)
        }
        let core = RouterCore(config: config, logger: logger)
        let server = FrameServer(path: options.routerSocketPath, handler: RouterHandler(core: core), logger: logger)
        let group = ServiceGroup(
            configuration: .init(services: [server], gracefulShutdownSignals: [.sigterm, .sigint], logger: logger))
        logger.info("router starting", metadata: ["tenants": "\(config.tenants.count)"])
        try await group.run()
    }
}
