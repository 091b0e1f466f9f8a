import ArgumentParser
import Foundation
import KafkaClient
import Logging
import ServiceLifecycle
import Shared

/// `kafka-out dev-cluster`: librdkafka's mock cluster for local use and tests, until stopped.
struct DevCluster: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dev-cluster",
        abstract: "Run librdkafka's in-memory mock Kafka cluster (development and tests only).")

    @OptionGroup var options: CommonOptions

    @Option(help: "Number of brokers.")
    var brokers: Int = 3

    @Option(help: "Where to write the bootstrap servers (default: <run-dir>/dev-cluster.bootstrap).")
    var bootstrapFile: String?

    @Option(name: .customLong("topic"), help: "Create a topic up front: NAME or NAME:PARTITIONS (repeatable). Others are created on first use with 4 partitions.")
    var topics: [String] = []

    static func defaultBootstrapFile(runDir: String) -> String {
        (runDir as NSString).appendingPathComponent("dev-cluster.bootstrap")
    }

    func validate() throws {
        guard (1...16).contains(brokers) else { throw ValidationError("--brokers must be 1...16") }
    }

    func run() async throws {
        let logger = try options.start(process: "dev-cluster")
        let cluster = try MockCluster(brokers: brokers)
        for spec in topics {
            let parts = spec.split(separator: ":")
            let count = parts.count > 1 ? Int(parts[1]) ?? MockCluster.autoCreatedPartitions : MockCluster.autoCreatedPartitions
            try cluster.createTopic(String(parts[0]), partitions: count, replicationFactor: min(brokers, 3))
        }
        let file = bootstrapFile ?? Self.defaultBootstrapFile(runDir: options.runDir)
        let temporary = file + ".tmp"
        try Data((cluster.bootstrapServers + "\n").utf8).write(to: URL(fileURLWithPath: temporary))
        guard rename(temporary, file) == 0 else { throw ValidationError("cannot write \(file)") }
        let control = DevClusterControl(
            path: (options.runDir as NSString).appendingPathComponent("dev-cluster.control"), cluster: cluster, logger: logger)
        try control.start()
        defer { control.stop() }
        logger.warning(
            "dev cluster running: librdkafka mock cluster, in memory, PLAINTEXT, for development and tests only",
            metadata: [
                "kafka.bootstrap": "\(cluster.bootstrapServers)", "bootstrap.file": "\(file)", "control.socket": "\(control.path)",
            ])
        let group = ServiceGroup(
            configuration: .init(
                services: [UntilShutdown()], gracefulShutdownSignals: [.sigterm, .sigint], logger: logger))
        try await group.run()
        unlink(file)
        withExtendedLifetime(cluster) {}
    }
}

/// A service that does nothing until asked to shut down.
struct UntilShutdown: Service {
    func run() async throws {
        try? await gracefulShutdown()
    }
}
