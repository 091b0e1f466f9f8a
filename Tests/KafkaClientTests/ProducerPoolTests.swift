import Foundation
import KafkaClient
import NIOConcurrencyHelpers
@_spi(CustomByteBufferAllocator) import NIOCore
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

    /// Messages lent to librdkafka from a buffer whose only other owner lets go at once: the pool
    /// keeps the bytes until every message is reported (also for a forgotten group), then lets
    /// them go. The buffer's allocator overwrites a block when it is freed, so bytes let go too
    /// early reach the broker as "X"s.
    func testLentBytesStayUntilTheirMessagesAreReported() throws {
        let cluster = try MockCluster(brokers: 1)
        let outcomes = Outcomes()
        let pool = ProducerPool<String>(logger: .init(label: "test"), onOutcomes: outcomes.add)
        let producer = try pool.producer(
            for: .init(bootstrapServers: cluster.bootstrapServers, securityProtocol: .plaintext), metadata: [:])
        let topic = try producer.topic("lent")
        let before = PoisoningAllocator.frees

        func lend(_ values: [String], context: String) -> ProducerPool<String>.Group {
            var buffer = PoisoningAllocator.allocator.buffer(capacity: 4096)
            var ranges: [Range<Int>] = []
            for v in values {
                let start = buffer.writerIndex
                buffer.writeString(v)
                ranges.append(start..<buffer.writerIndex)
            }
            let group = pool.begin(producer, count: values.count, context: context, keeping: buffer)
            for (i, r) in ranges.enumerated() {
                let slice = buffer.getSlice(at: r.lowerBound, length: r.count)!
                let failure: KafkaError? = slice.withUnsafeReadableBytes { value in
                    do throws(KafkaError) {
                        try producer.produce(topic: topic, key: nil, value: value, headers: KafkaHeaders([]), id: group.id(i), lent: true)
                        return nil
                    } catch { return error }
                }
                XCTAssertNil(failure)
            }
            return group
        }
        _ = lend(["{\"kept\":0}", "{\"kept\":1}"], context: "kept")
        _ = lend(["{\"forgotten\":0}"], context: "forgotten")
        pool.forget { $0 == "forgotten" }

        XCTAssertTrue(eventually { outcomes.all.count == 1 })
        XCTAssertEqual(producer.flush(timeout: .seconds(10)), 0)
        XCTAssertEqual(outcomes.all.map(\.context), ["kept"])
        XCTAssertEqual(outcomes.all.first?.failures.isEmpty, true)
        let values = try Kcat.consume(bootstrap: cluster.bootstrapServers, topic: "lent").map(\.value).sorted()
        XCTAssertEqual(values, ["{\"forgotten\":0}", "{\"kept\":0}", "{\"kept\":1}"])
        XCTAssertTrue(eventually { PoisoningAllocator.frees - before >= 2 }, "both buffers are let go once reported")
    }
}

/// A `ByteBufferAllocator` whose freed blocks are overwritten with "X" first, and counted. Each
/// block carries its size in 16 bytes before the buffer's.
enum PoisoningAllocator {
    private static let count = NIOLockedValueBox(0)
    static var frees: Int { count.withLockedValue { $0 } }

    static let allocator = ByteBufferAllocator(
        allocate: { size in
            let block = malloc(size + 16)!
            block.storeBytes(of: size, as: Int.self)
            return block + 16
        },
        reallocate: { pointer, _, size in
            let block = realloc(pointer.map { $0 - 16 }, size + 16)!
            block.storeBytes(of: size, as: Int.self)
            return block + 16
        },
        deallocate: { pointer in
            let block = pointer - 16
            memset(pointer, 0x58, block.load(as: Int.self))
            PoisoningAllocator.count.withLockedValue { $0 += 1 }
            free(block)
        },
        copy: { memcpy($0, $1, $2) })
}
