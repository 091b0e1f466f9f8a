import Foundation
import KafkaClient
import NIOConcurrencyHelpers
import TestSupport
import XCTest

/// A partition's messages wait while it has some in flight, then go as one round
/// (`ProducerConfiguration.partitionRounds`), against the mock cluster with slow brokers.
final class PartitionRoundsTests: XCTestCase {
    final class Reports: Sendable {
        let box = NIOLockedValueBox<[DeliveryReport]>([])
        func add(_ r: [DeliveryReport]) { box.withLockedValue { $0.append(contentsOf: r) } }
        var all: [DeliveryReport] { box.withLockedValue { $0 } }
    }

    /// The clusters of the test (kept alive until it ends).
    private var clusters: [MockCluster] = []

    /// A cluster whose brokers answer `rtt` ms late, a producer with rounds that reads its
    /// statistics (partition counts) ten times a second, and `topic` with `partitions`.
    private func setUp(
        topic: String, partitions: Int, rtt: Int, rounds: Bool = true
    ) throws -> (MockCluster, KafkaProducer, Reports) {
        let cluster = try MockCluster(brokers: 3)
        try cluster.createTopic(topic, partitions: partitions, replicationFactor: 3)
        var config = ProducerConfiguration(bootstrapServers: cluster.bootstrapServers, securityProtocol: .plaintext)
        config.statisticsInterval = .milliseconds(100)
        config.partitionRounds = rounds
        let reports = Reports()
        let producer = try KafkaProducer(configuration: config, logger: .init(label: "test"), onDelivery: reports.add)
        cluster.setRoundTripTime(rtt)
        clusters.append(cluster)
        return (cluster, producer, reports)
    }

    private func produce(_ producer: KafkaProducer, topic: String, key: String?, value: String, id: UInt64) throws {
        var v = value
        guard var k = key else {
            try v.withUTF8 { try producer.produce(topic: topic, key: nil, value: UnsafeRawBufferPointer($0), id: id) }
            return
        }
        try k.withUTF8 { kb in
            try v.withUTF8 { try producer.produce(topic: topic, key: UnsafeRawBufferPointer(kb), value: UnsafeRawBufferPointer($0), id: id) }
        }
    }

    /// Produces one message and waits for its report, then for the statistics to name the
    /// topic's partitions: from then on the producer holds messages for their rounds.
    private func warmUp(_ producer: KafkaProducer, _ reports: Reports, topic: String) throws {
        try produce(producer, topic: topic, key: "warm-up", value: "w", id: 1_000_000)
        XCTAssertTrue(eventually(timeout: 30) { reports.all.contains { $0.id == 1_000_000 } })
        Thread.sleep(forTimeInterval: 0.5)
    }

    func testMessagesWaitWhileTheirPartitionHasFiveInFlightThenGoInOrder() throws {
        let (cluster, producer, reports) = try setUp(topic: "rounds", partitions: 3, rtt: 400)
        try warmUp(producer, reports, topic: "rounds")
        for i in 0..<5 { try produce(producer, topic: "rounds", key: "k", value: "\(i)", id: UInt64(1 + i)) }
        Thread.sleep(forTimeInterval: 0.1)  // that round left (linger 5 ms) and waits for its answer
        for i in 5...24 { try produce(producer, topic: "rounds", key: "k", value: "\(i)", id: UInt64(1 + i)) }
        XCTAssertEqual(producer.held, 20, "the partition has 5 in flight: the rest waits for their answers")
        XCTAssertEqual(producer.outstanding, 25)

        XCTAssertTrue(eventually(timeout: 30) { reports.all.filter { $0.id <= 25 }.count == 25 })
        XCTAssertEqual(producer.held, 0)
        XCTAssertTrue(reports.all.allSatisfy { $0.error == nil })
        let partition = reports.all.first { $0.id == 1 }!.partition
        XCTAssertTrue(reports.all.filter { $0.id <= 25 }.allSatisfy { $0.partition == partition })

        let messages = try Kcat.consume(bootstrap: cluster.bootstrapServers, topic: "rounds").filter { $0.key == "k" }
        XCTAssertEqual(messages.map(\.value), (0...24).map(String.init), "one key's messages keep their order")
    }

    /// Below five in flight a partition's next round does not wait for answers (librdkafka alone
    /// would send it too): only for its linger.
    func testFewerThanFiveInFlightDoNotHoldTheNextRound() throws {
        let (_, producer, reports) = try setUp(topic: "few", partitions: 1, rtt: 1000)
        try warmUp(producer, reports, topic: "few")
        try produce(producer, topic: "few", key: "k", value: "0", id: 1)
        Thread.sleep(forTimeInterval: 0.1)
        try produce(producer, topic: "few", key: "k", value: "1", id: 2)
        XCTAssertTrue(eventually(timeout: 0.5) { producer.held == 0 }, "the second went after its linger, not after the first's answer")
        XCTAssertEqual(producer.outstanding, 2)
        XCTAssertTrue(eventually(timeout: 30) { Set(reports.all.map(\.id)).isSuperset(of: [1, 2]) })
    }

    /// The partition a key goes to is the one librdkafka's own partitioner chooses.
    func testKeysGoToTheSamePartitionsAsWithoutRounds() throws {
        var chosen: [[Int32]] = []
        for rounds in [true, false] {
            let (_, producer, reports) = try setUp(topic: "keys", partitions: 7, rtt: 0, rounds: rounds)
            try warmUp(producer, reports, topic: "keys")
            for i in 0..<200 { try produce(producer, topic: "keys", key: "user-\(i * 7919)", value: "\(i)", id: UInt64(i + 1)) }
            // With rounds the partitions' first messages wait here for their linger.
            XCTAssertEqual(producer.held > 0, rounds)
            XCTAssertTrue(eventually(timeout: 30) { reports.all.filter { $0.id <= 200 }.count == 200 })
            chosen.append((1...200).map { id in reports.all.first { $0.id == UInt64(id) }!.partition })
        }
        XCTAssertEqual(chosen[0], chosen[1])
        XCTAssertGreaterThan(Set(chosen[0]).count, 3, "keys spread over the partitions")
    }

    func testFlushHandsOverWhatIsHeld() throws {
        let (_, producer, reports) = try setUp(topic: "flush", partitions: 2, rtt: 300)
        try warmUp(producer, reports, topic: "flush")
        for i in 1...5 { try produce(producer, topic: "flush", key: "k", value: "\(i)", id: UInt64(i)) }
        Thread.sleep(forTimeInterval: 0.05)
        for i in 6...10 { try produce(producer, topic: "flush", key: "k", value: "\(i)", id: UInt64(i)) }
        XCTAssertEqual(producer.held, 5)
        XCTAssertEqual(producer.flush(timeout: .seconds(30)), 0)
        XCTAssertEqual(producer.held, 0)
        XCTAssertTrue(eventually { Set(reports.all.map(\.id)).isSuperset(of: Set(1...10)) })
        XCTAssertTrue(reports.all.allSatisfy { $0.error == nil })
    }

    /// A message librdkafka refuses when its round goes (here: too large) is reported failed,
    /// not lost, and the partition's next messages still go.
    func testAMessageRefusedWhenItsRoundGoesIsReportedAndTheRestStillGo() throws {
        let (_, producer, reports) = try setUp(topic: "refused", partitions: 1, rtt: 300)
        try warmUp(producer, reports, topic: "refused")
        for i in 4...8 { try produce(producer, topic: "refused", key: "k", value: "before", id: UInt64(i)) }
        Thread.sleep(forTimeInterval: 0.05)
        let big = String(repeating: "x", count: 2_000_000)
        try produce(producer, topic: "refused", key: "k", value: big, id: 2)
        try produce(producer, topic: "refused", key: "k", value: "after", id: 3)
        XCTAssertEqual(producer.held, 2)
        XCTAssertTrue(eventually(timeout: 30) { Set(reports.all.map(\.id)).isSuperset(of: [2, 3, 4, 5, 6, 7, 8]) })
        let refused = reports.all.first { $0.id == 2 }
        XCTAssertEqual(refused?.error?.name, "MSG_SIZE_TOO_LARGE")
        XCTAssertEqual(refused?.error?.isRetriable, false)
        XCTAssertNil(reports.all.first { $0.id == 3 }?.error)
    }

    /// Without a key each message goes to a random partition, rounds or not.
    func testMessagesWithoutAKeySpreadOverThePartitions() throws {
        let (_, producer, reports) = try setUp(topic: "nokey", partitions: 4, rtt: 0)
        try warmUp(producer, reports, topic: "nokey")
        for i in 0..<200 { try produce(producer, topic: "nokey", key: nil, value: "\(i)", id: UInt64(i + 1)) }
        XCTAssertTrue(eventually(timeout: 30) { reports.all.filter { $0.id <= 200 }.count == 200 })
        XCTAssertEqual(Set(reports.all.filter { $0.id <= 200 }.map(\.partition)).count, 4)
    }

    /// The statistics the rounds partition by name each topic's partition count.
    func testStatisticsNameEachTopicsPartitionCount() throws {
        let cluster = try MockCluster(brokers: 3)
        try cluster.createTopic("five", partitions: 5, replicationFactor: 3)
        var config = ProducerConfiguration(bootstrapServers: cluster.bootstrapServers, securityProtocol: .plaintext)
        config.statisticsInterval = .milliseconds(100)
        let counts = NIOLockedValueBox<[String: Int]>([:])
        let producer = try KafkaProducer(
            configuration: config, logger: .init(label: "test"),
            onStatistics: { stats in counts.withLockedValue { $0 = stats.partitionCounts } }, onDelivery: { _ in })
        try produce(producer, topic: "five", key: "k", value: "v", id: 1)
        XCTAssertTrue(eventually(timeout: 30) { counts.withLockedValue { $0["five"] } == 5 })
        withExtendedLifetime(cluster) {}
    }
}
