import KafkaClient
import Observability
import Prometheus

/// An output process's Prometheus metrics (`sluice_kafka_out_…`, `sluice_keen_out_…`).
public struct OutputMetrics: Sendable {
    public let delivered: Counter
    public let failed: Counter
    public let producers: Gauge
    let queued: Gauge
    let rttAverage: Gauge
    let rttP99: Gauge

    public init(process: String) {
        let p = "sluice_\(process)"
        let help = "Messages confirmed (delivered) or reported failed by the destination."
        delivered = Metrics.counter("\(p)_messages_total", help, [("outcome", "delivered")])
        failed = Metrics.counter("\(p)_messages_total", help, [("outcome", "failed")])
        producers = Metrics.gauge("\(p)_producers", "Kafka producers open (one per cluster and credentials).")
        queued = Metrics.gauge("\(p)_queue_messages", "Messages in librdkafka's queues, not yet confirmed (from its statistics).")
        rttAverage = Metrics.gauge(
            "\(p)_broker_rtt_average_seconds", "The slowest broker's average request round trip (librdkafka statistics).")
        rttP99 = Metrics.gauge("\(p)_broker_rtt_p99_seconds", "The slowest broker's p99 request round trip (librdkafka statistics).")
    }

    /// The latest statistics of every producer.
    public func record(_ all: [ProducerStatistics]) {
        queued.set(Double(all.reduce(0) { $0 + $1.queuedMessages }))
        rttAverage.set(all.map(\.brokerRoundTripAverage).max() ?? 0)
        rttP99.set(all.map(\.brokerRoundTripP99).max() ?? 0)
    }
}
