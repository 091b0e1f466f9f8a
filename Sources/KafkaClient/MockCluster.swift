import CRdKafka

/// librdkafka's in-memory mock Kafka cluster: real Kafka protocol on 127.0.0.1 ports, for local use
/// and tests. It lives as long as this object.
public final class MockCluster: @unchecked Sendable {
    private let handle: OpaquePointer
    private let cluster: OpaquePointer
    public let bootstrapServers: String
    /// Partitions librdkafka's mock cluster gives a topic created on first use.
    public static let autoCreatedPartitions = 4

    public init(brokers: Int) throws(KafkaError) {
        let conf = rd_kafka_conf_new()!
        var errstr = [CChar](repeating: 0, count: 512)
        _ = rd_kafka_conf_set(conf, "log_level", "3", &errstr, errstr.count)
        guard let rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, &errstr, errstr.count) else {
            rd_kafka_conf_destroy(conf)
            throw .configuration("cannot create the mock cluster's client: \(errorText(errstr))")
        }
        guard let mc = rd_kafka_mock_cluster_new(rk, Int32(brokers)) else {
            rd_kafka_destroy(rk)
            throw .configuration("cannot create a mock cluster with \(brokers) brokers")
        }
        handle = rk
        cluster = mc
        bootstrapServers = String(cString: rd_kafka_mock_cluster_bootstraps(mc))
    }

    deinit {
        rd_kafka_mock_cluster_destroy(cluster)
        rd_kafka_destroy(handle)
    }

    public func createTopic(_ name: String, partitions: Int, replicationFactor: Int = 1) throws(KafkaError) {
        let err = rd_kafka_mock_topic_create(cluster, name, Int32(partitions), Int32(replicationFactor))
        if err != RD_KAFKA_RESP_ERR_NO_ERROR { throw KafkaError(err) }
    }

    /// Takes a broker (or all, with -1) down — connections closed, new ones refused — or up again.
    public func setBroker(_ id: Int32, up: Bool) {
        if up { _ = rd_kafka_mock_broker_set_up(cluster, id) } else { _ = rd_kafka_mock_broker_set_down(cluster, id) }
    }

    /// Delays every answer of a broker (or all, with -1).
    public func setRoundTripTime(_ milliseconds: Int, broker: Int32 = -1) {
        _ = rd_kafka_mock_broker_set_rtt(cluster, broker, Int32(milliseconds))
    }

    /// Makes the next requests of this API (e.g. 0, Produce) fail with these Kafka error codes.
    public func pushRequestErrors(apiKey: Int16, errors: [Int32]) {
        let codes = errors.map { rd_kafka_resp_err_t(rawValue: $0) }
        codes.withUnsafeBufferPointer { rd_kafka_mock_push_request_errors_array(cluster, apiKey, codes.count, $0.baseAddress) }
    }
}
