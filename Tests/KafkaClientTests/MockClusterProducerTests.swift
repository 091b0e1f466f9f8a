import Foundation
import KafkaClient
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import TestSupport
import XCTest

/// The producer against librdkafka's mock cluster, checked with kcat (an independent consumer).
final class MockClusterProducerTests: XCTestCase {
    final class Reports: Sendable {
        let box = NIOLockedValueBox<[DeliveryReport]>([])
        func add(_ r: [DeliveryReport]) { box.withLockedValue { $0.append(contentsOf: r) } }
        var all: [DeliveryReport] { box.withLockedValue { $0 } }
    }

    func testDeliversKeyedMessagesAndReportsEachByID() throws {
        let cluster = try MockCluster(brokers: 3)
        try cluster.createTopic("t1", partitions: 4, replicationFactor: 3)
        let reports = Reports()
        let producer = try KafkaProducer(
            configuration: .init(bootstrapServers: cluster.bootstrapServers, securityProtocol: .plaintext),
            logger: .init(label: "test"), onDelivery: reports.add)
        let keys = ["-9223372036854775808", "9223372036854775807", "42"]
        for (i, key) in keys.enumerated() {
            var k = key
            var v = "{\"n\":\(i)}"
            try k.withUTF8 { kb in
                try v.withUTF8 { vb in
                    try producer.produce(topic: "t1", key: UnsafeRawBufferPointer(kb), value: UnsafeRawBufferPointer(vb), id: UInt64(i + 1))
                }
            }
        }
        var v = "{\"n\":\"nokey\"}"
        try v.withUTF8 { try producer.produce(topic: "t1", key: nil, value: UnsafeRawBufferPointer($0), id: 100) }
        XCTAssertTrue(eventually { reports.all.count == 4 })
        XCTAssertEqual(Set(reports.all.map(\.id)), [1, 2, 3, 100])
        XCTAssertTrue(reports.all.allSatisfy { $0.error == nil })

        let messages = try Kcat.consume(bootstrap: cluster.bootstrapServers, topic: "t1")
        XCTAssertEqual(messages.count, 4)
        for (i, key) in keys.enumerated() {
            let m = messages.first { $0.value == "{\"n\":\(i)}" }
            XCTAssertEqual(m?.key, key)
        }
        XCTAssertNil(messages.first { $0.value == "{\"n\":\"nokey\"}" }?.key)
    }

    /// Served on an event loop (as kafka-out does): every report arrives on that loop, and a
    /// producer that goes away closes its pipe and librdkafka's sockets.
    func testEventsServedOnALoopReportEveryMessageThereAndTheProducerStopsCleanly() throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let loop = group.next()
        let cluster = try MockCluster(brokers: 3)
        try cluster.createTopic("loop", partitions: 3, replicationFactor: 3)
        let descriptorsBefore = try Self.openDescriptors()
        let reports = Reports()
        let offLoop = NIOLockedValueBox(0)
        var producer: KafkaProducer? = try KafkaProducer(
            configuration: .init(bootstrapServers: cluster.bootstrapServers, securityProtocol: .plaintext),
            logger: .init(label: "test"), eventLoop: loop,
            onDelivery: { r in
                if !loop.inEventLoop { offLoop.withLockedValue { $0 += 1 } }
                reports.add(r)
            })
        // More than one turn of the loop's draining, in several bursts.
        for burst in 0..<4 {
            for i in 0..<500 {
                var v = "{\"n\":\(burst * 500 + i)}"
                try v.withUTF8 {
                    try producer!.produce(topic: "loop", key: nil, value: UnsafeRawBufferPointer($0), id: UInt64(burst * 500 + i + 1))
                }
            }
            Thread.sleep(forTimeInterval: 0.05)
        }
        XCTAssertTrue(eventually(timeout: 30) { reports.all.count == 2000 }, "\(reports.all.count) of 2000 reported")
        XCTAssertEqual(Set(reports.all.map(\.id)), Set(1...2000))
        XCTAssertTrue(reports.all.allSatisfy { $0.error == nil })
        XCTAssertEqual(offLoop.withLockedValue { $0 }, 0, "reports served off the loop")
        XCTAssertEqual(try Kcat.consume(bootstrap: cluster.bootstrapServers, topic: "loop").count, 2000)

        XCTAssertGreaterThan(try Self.openDescriptors(), descriptorsBefore)
        producer = nil
        XCTAssertTrue(
            eventually(timeout: 10) { (try? Self.openDescriptors()) ?? .max <= descriptorsBefore },
            "descriptors left open: \((try? Self.openDescriptors()) ?? -1) against \(descriptorsBefore) before")
    }

    private static func openDescriptors() throws -> Int {
        try FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd").count
    }

    func testUndeliverableMessageIsReportedRetryableNeverDropped() throws {
        let cluster = try MockCluster(brokers: 1)
        let reports = Reports()
        var config = ProducerConfiguration(bootstrapServers: cluster.bootstrapServers, securityProtocol: .plaintext)
        config.messageTimeout = .milliseconds(1500)
        let producer = try KafkaProducer(configuration: config, logger: .init(label: "test"), onDelivery: reports.add)
        cluster.setBroker(1, up: false)
        var v = "{}"
        try v.withUTF8 { try producer.produce(topic: "down", key: nil, value: UnsafeRawBufferPointer($0), id: 7) }
        XCTAssertTrue(eventually(timeout: 30) { reports.all.count == 1 })
        let report = try XCTUnwrap(reports.all.first)
        XCTAssertEqual(report.id, 7)
        XCTAssertEqual(report.error?.name, "_MSG_TIMED_OUT")
        XCTAssertEqual(report.error?.isRetriable, true, "an expired message is retried, never lost")
    }

    func testOversizeMessageIsAPermanentError() throws {
        let cluster = try MockCluster(brokers: 1)
        let producer = try KafkaProducer(
            configuration: .init(bootstrapServers: cluster.bootstrapServers, securityProtocol: .plaintext),
            logger: .init(label: "test"), onDelivery: { _ in })
        let big = [UInt8](repeating: 0x41, count: 2_000_000)
        XCTAssertThrowsError(
            try big.withUnsafeBytes { try producer.produce(topic: "t", key: nil, value: $0, id: 1) }
        ) { error in
            let e = error as? KafkaError
            XCTAssertEqual(e?.name, "MSG_SIZE_TOO_LARGE")
            XCTAssertEqual(e?.isRetriable, false)
        }
    }
}
