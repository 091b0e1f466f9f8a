import ArgumentParser
import CCurl
import Foundation
import Logging
import Observability
import ServiceLifecycle
import Shared

/// keen-out: the Keen output process. This version registers with the router and refuses work:
/// Keen destinations are rejected at config load until the Keen transport lands, so no batch is
/// ever routed here.
@main
struct KeenOutCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "keen-out",
        abstract: "Publishes routed events to Keen (Kafka Inbound Cluster or HTTP API).")

    @OptionGroup var options: CommonOptions

    @Option(help: "Instance name announced to the router (default: keen-out-<pid>).")
    var instance: String?

    @Option(help: "Serve Prometheus metrics and /healthz on HOST:PORT (e.g. 127.0.0.1:9401). Off when not given.")
    var metricsListen: String?

    func run() async throws {
        let logger = try options.start(process: "keen-out")
        let version = String(cString: curl_version())
        logger.info("keen-out starting", metadata: ["curl.version": "\(version)"])
        let client = FrameClient(
            path: options.routerSocketPath, role: .keenOut,
            instance: instance ?? "keen-out-\(ProcessInfo.processInfo.processIdentifier)",
            handler: KeenRefuser(logger: logger), logger: logger)
        var services: [ServiceGroupConfiguration.ServiceConfiguration] = [.init(service: client)]
        if let metricsListen {
            services.append(.init(service: try metricsListener(address: metricsListen, process: "keen-out", logger: logger)))
        }
        let group = ServiceGroup(
            configuration: .init(services: services, gracefulShutdownSignals: [.sigterm, .sigint], logger: logger))
        try await group.run()
    }
}

/// Answers every batch with a permanent nack naming the missing capability.
struct KeenRefuser: FrameConnectionHandler {
    let logger: Logger
    func received(_ frame: Frame, from peer: FramePeer) async throws {
        if frame.type == .batch {
            logger.error("keen-out received a batch but the Keen transport is not available in this version")
            peer.send(.nack(frame.id, reason: "the Keen transport is not available in this version", retryable: false))
        }
    }
}
