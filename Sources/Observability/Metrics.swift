import NIOConcurrencyHelpers
import Prometheus

/// The process's Prometheus metrics. Each process registers its own (names `sluice_<process>_…`)
/// and serves them as Prometheus text on `/metrics`. Labels are bounded: kinds, outcomes and
/// reasons — never tenant ids or destination names (those are in `status`, not in metrics).
public enum Metrics {
    public static let registry = PrometheusCollectorRegistry()

    public static func counter(_ name: String, _ help: String, _ labels: [(String, String)] = []) -> Counter {
        registry.makeCounter(descriptor: descriptor(name, help), labels: labels)
    }

    public static func gauge(_ name: String, _ help: String, _ labels: [(String, String)] = []) -> Gauge {
        registry.makeGauge(descriptor: descriptor(name, help), labels: labels)
    }

    /// Latency buckets from 0.5 ms to 10 s.
    public static let latencyBuckets: [Duration] = [
        .microseconds(500), .milliseconds(1), .milliseconds(2), .milliseconds(5), .milliseconds(10), .milliseconds(25),
        .milliseconds(50), .milliseconds(100), .milliseconds(250), .milliseconds(500), .seconds(1), .milliseconds(2500),
        .seconds(5), .seconds(10),
    ]

    public static func histogram(
        _ name: String, _ help: String, _ labels: [(String, String)] = [], buckets: [Duration] = latencyBuckets
    ) -> DurationHistogram {
        registry.makeDurationHistogram(descriptor: descriptor(name, help), labels: labels, buckets: buckets)
    }

    private static let refreshers = NIOLockedValueBox<[@Sendable () -> Void]>([])

    /// Runs `refresh` before each scrape: for gauges read from state (spool size, connections).
    public static func onScrape(_ refresh: @escaping @Sendable () -> Void) {
        refreshers.withLockedValue { $0.append(refresh) }
    }

    /// The exposition text (format 0.0.4).
    public static func text() -> [UInt8] {
        for refresh in refreshers.withLockedValue({ $0 }) { refresh() }
        var out: [UInt8] = []
        out.reserveCapacity(16 << 10)
        registry.emit(into: &out)
        return out
    }

    public static let contentType = "text/plain; version=0.0.4; charset=utf-8"

    private static func descriptor(_ name: String, _ help: String) -> MetricNameDescriptor {
        MetricNameDescriptor(metricName: name, unitName: "", helpText: help)
    }
}

/// Records how long something took into a histogram.
public struct Stopwatch: Sendable {
    public let start = ContinuousClock.now
    public init() {}
    public var elapsed: Duration { ContinuousClock.now - start }
    public func record(into histogram: DurationHistogram) { histogram.record(ContinuousClock.now - start) }
}

/// Config reload outcomes, for the processes that read the config (ingest, router).
public enum ConfigMetrics {
    public static func record(applied: Bool) {
        Metrics.counter(
            "sluice_config_reloads_total", "Config reloads, by result (applied, rejected).",
            [("result", applied ? "applied" : "rejected")]
        ).increment()
    }
}
