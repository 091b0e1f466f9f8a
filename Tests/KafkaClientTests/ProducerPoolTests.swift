import Foundation
import KafkaClient
import NIOConcurrencyHelpers
import TestSupport
import XCTest

/// The producer pool's groups against librdkafka's mock cluster: one outcome per group, once every
/// message of it is settled, naming the messages that failed; checked at the broker with kcat.
final class ProducerPoolTests: XCTestCase {
    final class Outcomes: Sendable {
        let box = NIOLockedValueBox<[ProducerPool<String>.Outcome]>([])
        func add(_ o: [ProducerPool<String>.Outcome]) { box.withLockedValue { $0.append(contentsOf: o) } }
        var all: [ProducerPool<String>.Outcome] { box.withLockedValue { $0 } }
    }

    private func produce(
        _ value: String, eventID: String?, index: Int, of group: ProducerPool<String>.Group, topic: KafkaTopic,
        headers: KafkaHeaders, producer: KafkaProducer, pool: ProducerPool<String>
    ) {
        var v = value
        var key = "mpid-\(group.number)"
        do throws(KafkaError) {
            let name: StaticString = "sluice-event-id"
            let result: KafkaError? = v.withUTF8 { vb in
                key.withUTF8 { kb in
                    do throws(KafkaError) {
                        if var id = eventID {
                            let failure: KafkaError? = id.withUTF8 { ib in
                                do throws(KafkaError) {
                                    try producer.produce(
                                        topic: topic, key: UnsafeRawBufferPointer(kb), value: UnsafeRawBufferPointer(vb), headers: headers,
                                        extra: (UnsafeRawPointer(name.utf8Start).assumingMemoryBound(to: CChar.self), UnsafeRawBufferPointer(ib)),
                                        id: group.id(index))
                                    return nil
                                } catch { return error }
                            }
                            if let failure { throw failure }
                        } else {
                            try producer.produce(
                                topic: topic, key: UnsafeRawBufferPointer(kb), value: UnsafeRawBufferPointer(vb), headers: headers,
                                id: group.id(index))
                        }
                        return nil
                    } catch { return error }
                }
            }
            if let result { throw result }
        } catch {
            pool.refused(group, index: index, error: error)
        }
    }

    func testAGroupIsAnsweredOnceWithTheMessagesThatFailed() throws {
        let cluster = try MockCluster(brokers: 3)
        try cluster.createTopic("g", partitions: 3, replicationFactor: 3)
        let outcomes = Outcomes()
        let pool = ProducerPool<String>(logger: .init(label: "test"), onOutcomes: outcomes.add)
        let producer = try pool.producer(
            for: .init(bootstrapServers: cluster.bootstrapServers, securityProtocol: .plaintext), metadata: [:])
        let topic = try producer.topic("g")
        let headers = KafkaHeaders([("sluice-batch-id", "b-1"), ("empty", "")])
        let big = String(repeating: "x", count: 2_000_000)

        let first = pool.begin(producer, count: 5, context: "first")
        let second = pool.begin(producer, count: 2, context: "second")
        for i in 0..<5 {
            produce(i == 2 ? big : "{\"first\":\(i)}", eventID: "e\(i)", index: i, of: first, topic: topic, headers: headers, producer: producer, pool: pool)
            if i < 2 {
                produce("{\"second\":\(i)}", eventID: nil, index: i, of: second, topic: topic, headers: headers, producer: producer, pool: pool)
            }
        }
        XCTAssertTrue(eventually { outcomes.all.count == 2 })
        let byContext = Dictionary(uniqueKeysWithValues: outcomes.all.map { ($0.context, $0) })
        XCTAssertEqual(byContext["first"]?.count, 5)
        XCTAssertEqual(byContext["first"]?.failures.map(\.index), [2], "only the oversize message failed")
        XCTAssertEqual(byContext["first"]?.failures.first?.error.name, "MSG_SIZE_TOO_LARGE")
        XCTAssertEqual(byContext["first"]?.failures.first?.error.isRetriable, false)
        XCTAssertEqual(byContext["second"]?.count, 2)
        XCTAssertEqual(byContext["second"]?.failures.isEmpty, true)

        let messages = try Kcat.consume(bootstrap: cluster.bootstrapServers, topic: "g")
        XCTAssertEqual(messages.count, 6)
        for i in [0, 1, 3, 4] {
            let m = try XCTUnwrap(messages.first { $0.value == "{\"first\":\(i)}" })
            XCTAssertEqual(m.key, "mpid-\(first.number)")
            XCTAssertEqual(m.header("sluice-batch-id"), "b-1")
            XCTAssertEqual(m.header("empty"), "")
            XCTAssertEqual(m.header("sluice-event-id"), "e\(i)", "the extra header is the message's own")
        }
        let plain = try XCTUnwrap(messages.first { $0.value == "{\"second\":0}" })
        XCTAssertNil(plain.header("sluice-event-id"))
        XCTAssertEqual(plain.header("sluice-batch-id"), "b-1")
    }

    func testAForgottenGroupIsNotAnswered() throws {
        let cluster = try MockCluster(brokers: 1)
        let outcomes = Outcomes()
        let pool = ProducerPool<String>(logger: .init(label: "test"), onOutcomes: outcomes.add)
        let producer = try pool.producer(
            for: .init(bootstrapServers: cluster.bootstrapServers, securityProtocol: .plaintext), metadata: [:])
        let topic = try producer.topic("f")
        let headers = KafkaHeaders([])
        let gone = pool.begin(producer, count: 2, context: "gone")
        let kept = pool.begin(producer, count: 1, context: "kept")
        produce("{\"a\":0}", eventID: nil, index: 0, of: gone, topic: topic, headers: headers, producer: producer, pool: pool)
        pool.forget { $0 == "gone" }
        produce("{\"a\":1}", eventID: nil, index: 1, of: gone, topic: topic, headers: headers, producer: producer, pool: pool)
        produce("{\"b\":0}", eventID: nil, index: 0, of: kept, topic: topic, headers: headers, producer: producer, pool: pool)
        XCTAssertTrue(eventually { outcomes.all.count == 1 })
        XCTAssertEqual(producer.flush(timeout: .seconds(10)), 0)
        XCTAssertEqual(outcomes.all.map(\.context), ["kept"])
    }
    func testAClosedProducersUnreportedGroupsAreAnsweredRetryable() throws {
        // A destination swapped away from a cluster that is down: its producer is closed after
        // the flush timeout, long before librdkafka's message timeout; what it still held must be
        // answered (retryable), not wait for ever.
        let cluster = try MockCluster(brokers: 1)
        let outcomes = Outcomes()
        let pool = ProducerPool<String>(logger: .init(label: "test"), onOutcomes: outcomes.add)
        let configuration = ProducerConfiguration(bootstrapServers: cluster.bootstrapServers, securityProtocol: .plaintext)
        XCTAssertEqual(configuration.messageTimeout, .seconds(300))
        let producer = try pool.producer(for: configuration, metadata: [:])
        let topic = try producer.topic("closed")
        cluster.setBroker(1, up: false)
        let group = pool.begin(producer, count: 2, context: "held")
        for i in 0..<2 {
            produce("{\"c\":\(i)}", eventID: nil, index: i, of: group, topic: topic, headers: KafkaHeaders([]), producer: producer, pool: pool)
        }
        XCTAssertEqual(pool.retain([], flushTimeout: .milliseconds(300)), 1)
        XCTAssertEqual(pool.count, 0)
        XCTAssertTrue(eventually(timeout: 10) { outcomes.all.count == 1 })
        let outcome = try XCTUnwrap(outcomes.all.first)
        XCTAssertEqual(outcome.context, "held")
        XCTAssertEqual(outcome.failures.map(\.index), [0, 1])
        XCTAssertEqual(outcome.failures.map(\.error.isRetriable), [true, true])
        XCTAssertEqual(outcome.failures.first?.error.name, "_TIMED_OUT")
    }
}
