import Foundation
import KafkaClient
import Logging
import NIOConcurrencyHelpers
import NIOCore
import Outputs
import ServiceLifecycle
import Shared

/// Serves the router's connection: publishes each batch through a producer shared by every
/// destination of the same cluster and credentials, and answers `ack` only when Kafka confirmed
/// the message (`nack` with the reason otherwise).
final class KafkaPublisher: FrameConnectionHandler, Service {
    private let devBootstrapFile: String
    /// The dev cluster's bootstrap list, re-read at most once a second (not once per message).
    private let devBootstrap = NIOLockedValueBox<(text: String?, readAt: ContinuousClock.Instant?)>((nil, nil))
    private let tuning: ProducerTuning
    private let logger: Logger
    private let host: OutputHost<KafkaDestination>

    /// `eventLoop`: where the producers' delivery reports are served (the router connection's loop:
    /// the answers they make are written there).
    init(
        devBootstrapFile: String, tuning: ProducerTuning = ProducerTuning(), eventLoop: EventLoop? = nil, logger: Logger
    ) {
        self.devBootstrapFile = devBootstrapFile
        self.tuning = tuning
        self.logger = logger
        let relay = WeakRelay<KafkaPublisher>()
        host = OutputHost(
            process: "kafka_out", logger: logger, decode: { try KafkaDestination(wireJSON: $0) },
            configuration: { destination in relay.target.flatMap { try? $0.producerConfiguration(for: destination) } },
            eventLoop: eventLoop)
        relay.target = self
    }

    func run() async throws {
        try? await gracefulShutdown()
        await host.flushOnShutdown()
        logger.info("kafka-out stopped")
    }

    func received(_ frame: Frame, from peer: FramePeer) async throws {
        guard let batch = try host.handle(frame, from: peer) else { return }
        guard let key = batch.destination, batch.payload != nil else {
            throw FrameError.invalidFrame("batch frame without destination or payload")
        }
        guard let destination = host.destination(key) else {
            peer.send(.nack(batch.id, reason: "unknown destination \(key)", retryable: true))
            return
        }
        let producer: KafkaProducer
        do throws(KafkaError) {
            producer = try host.producer(for: try producerConfiguration(for: destination), key: key)
        } catch {
            peer.send(.nack(batch.id, reason: error.description, retryable: error.isRetriable))
            return
        }
        try await Delivery.produce(batch, from: peer, topic: destination.topic, producer: producer, pool: host.pool)
    }

    func disconnected(_ peer: FramePeer) async { host.disconnected(peer) }

    private func devBootstrapServers() -> String? {
        let now = ContinuousClock.now
        if let (text, readAt) = devBootstrap.withLockedValue({ v in v.readAt.map { (v.text, $0) } }), now - readAt < .seconds(1) {
            return text
        }
        let text = FileManager.default.contents(atPath: devBootstrapFile)
            .map { String(decoding: $0, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines) }
            .flatMap { $0.isEmpty ? nil : $0 }
        devBootstrap.withLockedValue { $0 = (text, now) }
        return text
    }

    func producerConfiguration(for d: KafkaDestination) throws(KafkaError) -> ProducerConfiguration {
        var bootstrap = d.bootstrapServers
        if d.usesDevCluster {
            guard let text = devBootstrapServers() else {
                throw KafkaError(
                    code: -1, name: "_DEV_CLUSTER_DOWN",
                    message: "the dev cluster is not running (no bootstrap file at \(devBootstrapFile))", isRetriable: true)
            }
            bootstrap = text
        }
        var configuration = ProducerConfiguration(destination: d, bootstrapServers: bootstrap)
        tuning.apply(to: &configuration, sendsBatches: d.settings.sendAsBatch)
        return configuration
    }
}
