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
              solo:
                api_key: k3
                api_secret: s3
                destinations:
                  p: {kind: kafka, bootstrap_servers: dev, topic: tp, plaintext: true, settings: {send_as_batch: false}}
            """)

    /// A batch of `count` custom events for tenant `solo` (one message per event), each event
    /// carrying `filler` bytes.
    func eventBatch(_ id: UInt64, count: Int, filler: Int = 0) -> Frame {
        var f = Frame(type: .batch, id: id)
        f.tenant = "solo"
        f.key = "u1"
        f.headers = [Header("sluice-batch-id", "b\(id)")]
        let events = (0..<count).map {
            #"{"event_type":"custom_event","data":{"source_message_id":"m\#($0)","x":"\#(String(repeating: "x", count: filler))"}}"#
        }
        f.payload = ByteBuffer(string: #"{"mpid":1,"events":[\#(events.joined(separator: ","))]}"#)
        return f
    }

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
        XCTAssertEqual(ingest.takeQueued().map(\.type), [.outputs], "ingest hears which outputs are live")
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
        let (core, out, ingest) = await routerWithOneOutput()
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

    /// A router with one kafka-out instance registered, and an ingest peer to send from.
    func routerWithOneOutput() async -> (RouterCore, FramePeer, FramePeer) {
        let core = RouterCore(config: config, logger: Logger(label: "t"))
        let out = peer(.kafkaOut, "1")
        await core.register(out)
        return (core, out, peer(.ingest, "in"))
    }

    /// The router's status row for `tenant`'s (first) destination.
    func statusRow(_ core: RouterCore, tenant: String) async -> JSONValue? {
        await core.status(config: nil)["destinations"]?.arrayValue?.first { $0["tenant"] == .string(tenant) }
    }

    /// Per event: a batch's messages for a destination go in one frame (one answer per batch).
    func testPerEventMessagesOfABatchTravelInOneFrame() async throws {
        let (core, out, ingest) = await routerWithOneOutput()
        await core.accept(eventBatch(1, count: 3), from: ingest)
        let sent = batches(out.takeQueued())
        XCTAssertEqual(sent.count, 1)
        let messages = try sent[0].messages()
        XCTAssertEqual(messages.count, 3)
        XCTAssertEqual(messages.map { $0.part?.eventID }, ["m0", "m1", "m2"])
        XCTAssertEqual(sent[0].headers, [Header("sluice-batch-id", "b1")])
        XCTAssertEqual(sent[0].key, "u1")
        for m in messages { XCTAssertEqual(try JSONValue.parse(m.payload)["events"]?.arrayValue?.count, 1) }
        let backlog = await core.backlog
        XCTAssertEqual(backlog, 3, "the backlog counts messages")
        await core.outcome(.ack(sent[0].id), from: out)
        XCTAssertEqual(ingest.takeQueued(), [.ack(1)])
        let row = await statusRow(core, tenant: "solo")
        XCTAssertEqual(row?["delivered"], .number("3"))
    }

    /// Some messages of a frame failed: the delivered ones are done, the permanent failures become
    /// the batch's dead letter, and only the retryable ones are sent again.
    func testAPartialNackRetriesOnlyTheRetryableMessages() async throws {
        let (core, out, ingest) = await routerWithOneOutput()
        await core.accept(eventBatch(1, count: 4), from: ingest)
        let sent = batches(out.takeQueued())
        XCTAssertEqual(sent.count, 1)
        await core.outcome(
            .nack(
                sent[0].id,
                failed: [
                    FailedPart(index: 0, reason: "MSG_SIZE_TOO_LARGE", retryable: false),
                    FailedPart(index: 2, reason: "_MSG_TIMED_OUT", retryable: true),
                ]), from: out)
        let settled = await core.backlog
        XCTAssertEqual(settled, 1, "two delivered and one dead-lettered are settled")
        var again: [Frame] = []
        for _ in 0..<100 where again.isEmpty {
            try await Task.sleep(for: .milliseconds(20))
            again = batches(out.takeQueued())
        }
        XCTAssertEqual(again.count, 1)
        XCTAssertNil(again.first?.parts, "a single message goes as a plain batch frame")
        XCTAssertEqual(again.first?.headers, [Header("sluice-batch-id", "b1"), Header("sluice-event-id", "m2")])
        XCTAssertEqual(ingest.takeQueued(), [])
        await core.outcome(.ack(again[0].id), from: out)
        let answer = ingest.takeQueued()
        XCTAssertEqual(answer.map(\.id), [1])
        let dead = try JSONValue.parse(XCTUnwrap(answer.first?.payload))["dead"]?.arrayValue
        XCTAssertEqual(dead?.count, 1)
        XCTAssertEqual(dead?.first?["reason"], .string("1 of 4 messages: MSG_SIZE_TOO_LARGE"))
        let row = await statusRow(core, tenant: "solo")
        XCTAssertEqual(row?["delivered"], .number("3"))
        XCTAssertEqual(row?["dead_lettered"], .number("1"))
        XCTAssertEqual(row?["retried"], .number("1"))
    }

    /// A frame carries at most about 1 MB of messages: a larger batch's go in several.
    func testMessagesBeyondAMegabyteGoInAnotherFrame() async throws {
        let (core, out, ingest) = await routerWithOneOutput()
        await core.accept(eventBatch(1, count: 3, filler: 400_000), from: ingest)
        let sent = batches(out.takeQueued())
        XCTAssertEqual(try sent.map { try $0.messages().count }, [2, 1])
        XCTAssertEqual(try sent[0].messages().map { $0.part?.eventID }, ["m0", "m1"])
        XCTAssertEqual(sent[1].headers?.last, Header("sluice-event-id", "m2"))
        // The message sent alone holds its own bytes, not the whole batch's output it was cut from
        // (the backlog counts only its bytes).
        let alone = try XCTUnwrap(sent[1].payload)
        XCTAssertLessThan(alone.storageCapacity, 2 * alone.readableBytes)
        for f in sent { await core.outcome(.ack(f.id), from: out) }
        XCTAssertEqual(ingest.takeQueued(), [.ack(1)])
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

    /// A destination whose output never answers fills only its share of the backlog: another
    /// destination's deliveries are still taken.
    func testADestinationThatIsDownFillsOnlyItsShareOfTheBacklog() async {
        let core = RouterCore(config: config, logger: Logger(label: "t"), maxBacklog: 100, maxBacklogBytes: 1000)
        let out = peer(.kafkaOut, "1")
        await core.register(out)
        let ingest = peer(.ingest, "in")
        _ = ingest.takeQueued()
        func delivery(_ id: UInt64, _ destination: String) -> Frame {
            var f = batch(id, key: "u", size: 300)
            f.destination = destination
            return f
        }
        // `a` never answers: three fit (900 of 1000 bytes), the fourth is refused.
        for id: UInt64 in 1...4 { await core.accept(delivery(id, "a"), from: ingest) }
        XCTAssertEqual(ingest.takeQueued(), [.nack(4, reason: "router backlog is full", retryable: true)])
        // `b` is over the total too, but holds nothing: it gets its share (500 bytes).
        await core.accept(delivery(5, "b"), from: ingest)
        await core.accept(delivery(6, "b"), from: ingest)
        XCTAssertEqual(ingest.takeQueued(), [.nack(6, reason: "router backlog is full", retryable: true)])
        let sent = batches(out.takeQueued())
        XCTAssertEqual(sent.count, 4)
        await core.outcome(.ack(sent[3].id), from: out)
        XCTAssertEqual(ingest.takeQueued(), [.ack(5)])
    }

    func testAfterABacklogFullNackLaterDeliveriesWaitForTheRefusedOne() async {
        let core = RouterCore(config: config, logger: Logger(label: "t"), maxBacklog: 1, maxBacklogBytes: 1 << 20)
        let out = peer(.kafkaOut, "1")
        await core.register(out)
        let ingest = peer(.ingest, "in")
        _ = ingest.takeQueued()
        func delivery(_ id: UInt64) -> Frame {
            var f = batch(id, key: "u")
            f.destination = "a"
            return f
        }
        await core.accept(delivery(1), from: ingest)
        await core.accept(delivery(2), from: ingest)
        XCTAssertEqual(ingest.takeQueued(), [.nack(2, reason: "router backlog is full", retryable: true)])
        let first = batches(out.takeQueued())
        await core.outcome(.ack(first[0].id), from: out)
        XCTAssertEqual(ingest.takeQueued(), [.ack(1)])
        // Room again, but delivery 3 must not overtake the refused 2.
        await core.accept(delivery(3), from: ingest)
        XCTAssertEqual(ingest.takeQueued(), [.nack(3, reason: "router backlog is full", retryable: true)])
        await core.accept(delivery(2), from: ingest)
        XCTAssertEqual(batches(out.takeQueued()).count, 1, "the refused delivery goes first")
    }

    // MARK: Scaling: order per user across a change of instances

    func testAKeyStaysOnItsInstanceWhileItHasWorkInFlightEvenWhenInstancesJoin() async {
        let core = RouterCore(config: config, logger: Logger(label: "t"))
        let a = peer(.kafkaOut, "kafka-out-1")
        await core.register(a)
        let ingest = peer(.ingest, "in")
        // Find a key that rendezvous hashing would move to the newcomer.
        let b = peer(.kafkaOut, "kafka-out-2")
        let key = (0..<1000).map { "user-\($0)" }.first { RouterCore.rendezvous($0, [a, b]) == b }!
        await core.accept(batch(1, key: key), from: ingest)
        let first = batches(a.takeQueued())
        XCTAssertEqual(first.count, 2)
        await core.register(b)
        await core.accept(batch(2, key: key), from: ingest)
        XCTAssertEqual(batches(b.takeQueued()).count, 0, "a later batch must not overtake the earlier one on another instance")
        let second = batches(a.takeQueued())
        XCTAssertEqual(second.count, 2)
        for f in first + second { await core.outcome(.ack(f.id), from: a) }
        // Nothing in flight for the key: now it goes where the new set of instances puts it.
        await core.accept(batch(3, key: key), from: ingest)
        XCTAssertEqual(batches(b.takeQueued()).count, 2)
        XCTAssertEqual(batches(a.takeQueued()).count, 0)
    }

    func testWorkOfADepartedInstanceMovesOldestFirstAndItsUsersFollow() async {
        let core = RouterCore(config: config, logger: Logger(label: "t"))
        let a = peer(.kafkaOut, "kafka-out-1")
        let b = peer(.kafkaOut, "kafka-out-2")
        await core.register(a)
        let ingest = peer(.ingest, "in")
        for i in 1...3 { await core.accept(batch(UInt64(i), key: "u"), from: ingest) }
        let sentToA = batches(a.takeQueued())
        await core.register(b)
        await core.unregister(a)
        let moved = batches(b.takeQueued())
        XCTAssertEqual(moved.map(\.id), sentToA.map(\.id), "same items, same order")
        await core.accept(batch(4, key: "u"), from: ingest)
        XCTAssertEqual(batches(b.takeQueued()).count, 2, "the user's next batch follows its earlier ones")
    }

    func testRendezvousMovesOnlyTheKeysOfTheChangedInstance() {
        let peers = (1...3).map { peer(.kafkaOut, "kafka-out-\($0)") }
        let keys = (0..<3000).map { "mpid-\($0)" }
        let before = keys.map { RouterCore.rendezvous($0, peers).instance! }
        let after = keys.map { RouterCore.rendezvous($0, Array(peers.prefix(2))).instance! }
        for (x, y) in zip(before, after) where x != "kafka-out-3" { XCTAssertEqual(x, y) }
        let shares = Dictionary(grouping: before, by: { $0 }).mapValues(\.count)
        XCTAssertTrue(shares.values.allSatisfy { $0 > 800 }, "keys spread over all instances: \(shares)")
    }

    // MARK: Reload

    func reloaded(_ yaml: String) -> SluiceConfig { try! SluiceConfig.parse(yaml: yaml) }

    func testReloadRoutesNewBatchesToTheNewSettingsAndRetiresTheOldOnceDrained() async throws {
        let core = RouterCore(config: config, logger: Logger(label: "t"))
        let out = peer(.kafkaOut, "1")
        let ingest = peer(.ingest, "in")
        await core.register(out)
        var one = batch(1, key: "k")
        one.destination = "a"
        await core.accept(one, from: ingest)
        let before = out.takeQueued()
        XCTAssertEqual(before.compactMap(\.destination), ["acme/a#1", "acme/a#1"])
        await core.apply(
            reloaded(
                """
                tenants:
                  acme:
                    api_key: k1
                    api_secret: s1
                    destinations:
                      a: {kind: kafka, bootstrap_servers: dev, topic: ta-v2, plaintext: true}
                      c: {kind: kafka, bootstrap_servers: dev, topic: tc, plaintext: true}
                """))
        XCTAssertEqual(out.takeQueued().filter { $0.type == .destination }, [], "the old key is still in use")
        var two = batch(2, key: "k")
        two.destination = "a"
        await core.accept(two, from: ingest)
        let after = out.takeQueued()
        XCTAssertEqual(after.map(\.type), [.destination, .batch])
        XCTAssertEqual(after[0].destination, "acme/a#2")
        XCTAssertEqual(try JSONValue.parse(after[0].payload!)["topic"], .string("ta-v2"))
        // The batch routed before the reload finishes on its own settings; then the old key is retired.
        await core.outcome(.ack(before[1].id), from: out)
        let retire = out.takeQueued()
        XCTAssertEqual(retire.map(\.type), [.destination])
        XCTAssertEqual(retire.first?.destination, "acme/a#1")
        XCTAssertNil(retire.first?.payload, "a destination frame without settings means: forget it")
        // A removed destination still drains what ingest holds for it.
        var three = batch(3, key: nil)
        three.destination = "b"
        await core.accept(three, from: ingest)
        let drained = batches(out.takeQueued())
        XCTAssertEqual(drained.map(\.destination), ["acme/b#1"])
        let status = await core.status(config: nil)
        let b = status["destinations"]?.arrayValue?.first { $0["destination"] == .string("b") }
        XCTAssertEqual(b?["state"], .string("removed"))
    }

    func testAnUnknownDestinationMakesTheRouterReadTheConfigAgain() async {
        let core = RouterCore(config: config, logger: Logger(label: "t"))
        let out = peer(.kafkaOut, "1")
        await core.register(out)
        let newer = reloaded(
            """
            tenants:
              acme:
                api_key: k1
                api_secret: s1
                destinations:
                  z: {kind: kafka, bootstrap_servers: dev, topic: tz, plaintext: true}
            """)
        await core.setRefresh { await core.apply(newer) }
        let ingest = peer(.ingest, "in")
        var f = batch(1, key: nil)
        f.destination = "z"
        await core.accept(f, from: ingest)
        XCTAssertEqual(batches(out.takeQueued()).map(\.destination), ["acme/z#1"])
    }

    func testIngestHearsWhetherEveryNeededOutputKindIsLive() async throws {
        let core = RouterCore(config: config, logger: Logger(label: "t"))
        let ingest = peer(.ingest, "in")
        await core.register(ingest)
        func ready() throws -> Bool? {
            try ingest.takeQueued().last.flatMap { try JSONValue.parse($0.payload!)["ready"] }.map { $0 == .bool(true) }
        }
        XCTAssertEqual(try ready(), false)
        let out = peer(.kafkaOut, "1")
        await core.register(out)
        XCTAssertEqual(try ready(), true)
        await core.unregister(out)
        XCTAssertEqual(try ready(), false)
    }
}
