import Logging
import NIOCore
import XCTest

@testable import Shared
@testable import router

final class RouterCoreTests: XCTestCase {
    let config = try! SluiceConfig.parse(
        yaml: """
            tenants:
              acme:
                api_key: k1
                api_secret: s1
                destinations:
                  a: {kind: kafka, bootstrap_servers: dev, topic: ta, plaintext: true}
                  b: {kind: kafka, bootstrap_servers: dev, topic: tb, plaintext: true}
              empty: {api_key: k2, api_secret: s2}
            """)

    func peer(_ role: PeerRole, _ name: String) -> FramePeer {
        let p = FramePeer()
        p.identify(role: role, instance: name)
        return p
    }

    func batch(_ id: UInt64, key: String?, tenant: String = "acme", size: Int = 2) -> Frame {
        var f = Frame(type: .batch, id: id)
        f.tenant = tenant
        f.key = key
        f.payload = ByteBuffer(string: "{" + String(repeating: " ", count: max(0, size - 2)) + "}")
        return f
    }

    func batches(_ frames: [Frame]) -> [Frame] { frames.filter { $0.type == .batch } }

    func testEachDestinationGetsTheBatchWithItsSettingsFirstAndIngestIsAcked() async {
        let core = RouterCore(config: config, logger: Logger(label: "t"))
        let out = peer(.kafkaOut, "ko-1")
        let ingest = peer(.ingest, "in")
        await core.register(out)
        await core.register(ingest)
        await core.accept(batch(7, key: "42"), from: ingest)
        XCTAssertEqual(ingest.takeQueued(), [], "ingest hears back only when every destination has the batch")
        let sent = out.takeQueued()
        XCTAssertEqual(sent.map(\.type), [.destination, .batch, .destination, .batch])
        XCTAssertEqual(sent[0].destination, sent[1].destination)
        XCTAssertEqual(Set(sent.compactMap(\.destination)), ["acme/a#1", "acme/b#1"])
        let spec = try! JSONValue.parse(sent[0].payload!)
        XCTAssertEqual(spec["topic"], .string("ta"))
        XCTAssertEqual(sent[1].key, "42")
        // Settings are sent once per connection.
        await core.accept(batch(8, key: "42"), from: ingest)
        XCTAssertEqual(out.takeQueued().map(\.type), [.batch, .batch])
        await core.outcome(.ack(sent[1].id), from: out)
        XCTAssertEqual(ingest.takeQueued(), [])
        await core.outcome(.ack(sent[3].id), from: out)
        XCTAssertEqual(ingest.takeQueued(), [.ack(7)])
        let backlog = await core.backlog
        XCTAssertEqual(backlog, 2, "the second batch's two items are still in flight")
    }

    func testABatchSentAgainWhileInProgressIsNotDuplicated() async {
        let core = RouterCore(config: config, logger: Logger(label: "t"))
        let out = peer(.kafkaOut, "1")
        await core.register(out)
        let oldIngest = peer(.ingest, "in-1")
        await core.accept(batch(5, key: "k"), from: oldIngest)
        let sent = batches(out.takeQueued())
        XCTAssertEqual(sent.count, 2)
        // ingest restarted and sends its unfinished batches again.
        let newIngest = peer(.ingest, "in-2")
        await core.accept(batch(5, key: "k"), from: newIngest)
        XCTAssertTrue(batches(out.takeQueued()).isEmpty, "no second copy")
        for f in sent { await core.outcome(.ack(f.id), from: out) }
        XCTAssertEqual(newIngest.takeQueued(), [.ack(5)], "the answer goes to the current connection")
        XCTAssertEqual(oldIngest.takeQueued(), [])
    }

    func testOneKeyTakesOnePathAndKeylessBatchesSpread() async {
        let core = RouterCore(config: config, logger: Logger(label: "t"))
        let outs = [peer(.kafkaOut, "1"), peer(.kafkaOut, "2"), peer(.kafkaOut, "3")]
        for o in outs { await core.register(o) }
        let ingest = peer(.ingest, "in")
        for i in 0..<10 { await core.accept(batch(UInt64(i), key: "user-77"), from: ingest) }
        let counts = outs.map { batches($0.takeQueued()).count }
        XCTAssertEqual(counts.sorted(), [0, 0, 20], "all of one user's batches go through one instance")
        for i in 0..<30 { await core.accept(batch(UInt64(100 + i), key: nil), from: ingest) }
        XCTAssertTrue(outs.allSatisfy { !batches($0.takeQueued()).isEmpty }, "batches without a key spread")
    }

    func testWorkWaitsForAnOutputAndMovesWhenOneLeaves() async {
        let core = RouterCore(config: config, logger: Logger(label: "t"))
        let ingest = peer(.ingest, "in")
        await core.accept(batch(1, key: "k"), from: ingest)
        XCTAssertEqual(ingest.takeQueued(), [])
        let first = peer(.kafkaOut, "1")
        await core.register(first)
        XCTAssertEqual(batches(first.takeQueued()).count, 2, "waiting work goes to the first output that connects")
        let second = peer(.kafkaOut, "2")
        await core.register(second)
        await core.unregister(first)
        let moved = second.takeQueued()
        XCTAssertEqual(batches(moved).count, 2, "unconfirmed work of a departed instance goes to the others")
        XCTAssertEqual(moved.first?.type, .destination)
        // A late ack from the departed instance is ignored; the new one's ack finishes the work.
        for f in batches(moved) {
            await core.outcome(.ack(f.id), from: first)
            await core.outcome(.ack(f.id), from: second)
        }
        let backlog = await core.backlog
        XCTAssertEqual(backlog, 0)
        XCTAssertEqual(ingest.takeQueued(), [.ack(1)])
    }

    func testRetryableNackIsRetriedAndPermanentNackIsNot() async throws {
        let core = RouterCore(config: config, logger: Logger(label: "t"))
        let out = peer(.kafkaOut, "1")
        await core.register(out)
        let ingest = peer(.ingest, "in")
        await core.accept(batch(1, key: "k"), from: ingest)
        let sent = batches(out.takeQueued())
        await core.outcome(.nack(sent[0].id, reason: "_MSG_TIMED_OUT", retryable: true), from: out)
        await core.outcome(.nack(sent[1].id, reason: "MSG_SIZE_TOO_LARGE", retryable: false), from: out)
        var again: [Frame] = []
        for _ in 0..<100 where again.isEmpty {
            try await Task.sleep(for: .milliseconds(20))
            again = batches(out.takeQueued())
        }
        XCTAssertEqual(again.map(\.id), [sent[0].id], "only the retryable failure is sent again")
        try await Task.sleep(for: .milliseconds(300))
        XCTAssertTrue(batches(out.takeQueued()).isEmpty)
        await core.outcome(.ack(sent[0].id), from: out)
        let answer = ingest.takeQueued()
        XCTAssertEqual(answer.map(\.id), [1])
        let dead = try JSONValue.parse(XCTUnwrap(answer.first?.payload))["dead"]?.arrayValue
        XCTAssertEqual(dead?.count, 1)
        XCTAssertEqual(dead?.first?["reason"], .string("MSG_SIZE_TOO_LARGE"))
        XCTAssertNotNil(dead?.first?["destination"]?.stringValue)
    }

    func testUnknownTenantAndFullBacklogAreNacked() async {
        let core = RouterCore(config: config, logger: Logger(label: "t"), maxBacklog: 100, maxBacklogBytes: 1000)
        let ingest = peer(.ingest, "in")
        await core.accept(batch(1, key: nil, tenant: "nobody"), from: ingest)
        XCTAssertEqual(ingest.takeQueued(), [.nack(1, reason: "unknown tenant 'nobody'", retryable: false)])
        await core.accept(batch(2, key: nil, tenant: "empty"), from: ingest)
        XCTAssertEqual(ingest.takeQueued(), [.ack(2)], "a tenant without destinations is acked")
        await core.accept(batch(3, key: nil, size: 400), from: ingest)
        XCTAssertEqual(ingest.takeQueued(), [])
        await core.accept(batch(4, key: nil, size: 400), from: ingest)
        XCTAssertEqual(ingest.takeQueued(), [.nack(4, reason: "router backlog is full", retryable: true)])
    }
}
