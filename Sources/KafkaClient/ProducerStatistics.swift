import Foundation

/// The parts of librdkafka's statistics (`statistics.interval.ms`) worth exporting: how much is
/// queued in the client, and the slowest broker's round trip. Parsed with Foundation: it arrives
/// every few seconds, far from the hot path.
public struct ProducerStatistics: Sendable, Equatable {
    /// Messages in librdkafka's queues (waiting to be sent or for the broker's answer).
    public var queuedMessages: Int
    public var queuedBytes: Int
    /// The highest average and p99 round trip over the brokers this producer talks to (seconds).
    public var brokerRoundTripAverage: Double
    public var brokerRoundTripP99: Double
    /// Each topic's partition count, as the brokers' metadata gave it (topics without metadata yet
    /// are left out).
    public var partitionCounts: [String: Int]

    public init(
        queuedMessages: Int, queuedBytes: Int, brokerRoundTripAverage: Double, brokerRoundTripP99: Double,
        partitionCounts: [String: Int] = [:]
    ) {
        self.queuedMessages = queuedMessages
        self.queuedBytes = queuedBytes
        self.brokerRoundTripAverage = brokerRoundTripAverage
        self.brokerRoundTripP99 = brokerRoundTripP99
        self.partitionCounts = partitionCounts
    }

    public init?(json: Data) {
        guard let root = (try? JSONSerialization.jsonObject(with: json)) as? [String: Any] else { return nil }
        queuedMessages = (root["msg_cnt"] as? NSNumber)?.intValue ?? 0
        queuedBytes = (root["msg_size"] as? NSNumber)?.intValue ?? 0
        var average = 0.0
        var p99 = 0.0
        for case let broker as [String: Any] in (root["brokers"] as? [String: Any])?.values.map({ $0 }) ?? [] {
            // Bootstrap placeholders (nodeid -1) never carry requests.
            guard (broker["nodeid"] as? NSNumber)?.intValue ?? -1 >= 0, let rtt = broker["rtt"] as? [String: Any] else { continue }
            average = max(average, ((rtt["avg"] as? NSNumber)?.doubleValue ?? 0) / 1e6)
            p99 = max(p99, ((rtt["p99"] as? NSNumber)?.doubleValue ?? 0) / 1e6)
        }
        brokerRoundTripAverage = average
        brokerRoundTripP99 = p99
        var counts: [String: Int] = [:]
        for (name, topic) in root["topics"] as? [String: Any] ?? [:] {
            // Partition "-1" is librdkafka's queue for messages not yet partitioned; "unknown" ones
            // are not in the metadata.
            let partitions = (topic as? [String: Any])?["partitions"] as? [String: Any] ?? [:]
            let known = partitions.filter { id, p in
                (Int(id) ?? -1) >= 0 && !(((p as? [String: Any])?["unknown"] as? NSNumber)?.boolValue ?? false)
            }
            if !known.isEmpty { counts[name] = known.count }
        }
        partitionCounts = counts
    }
}
