import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import XCTest

@testable import Shared
@testable import ingest

/// Answers held while their destinations fall behind: the gate alone, then through the sink and
/// the feeder as ingest wires them.
final class IntakeGateTests: SpoolTestCase {
    let a = DeliveryTarget(tenant: "a", destination: "main")
    let b = DeliveryTarget(tenant: "b", destination: "main")

    /// A gate whose "behind" destinations the test sets.
    func makeGate(maxHold: Duration) -> (IntakeGate, NIOLockedValueBox<Set<DeliveryTarget>>) {
        let behind = NIOLockedValueBox<Set<DeliveryTarget>>([])
        let test: IntakeGate.Behind = {
            let now: Set<DeliveryTarget> = behind.withLockedValue { $0 }
            if now.isEmpty { return nil }
            return { (targets: [DeliveryTarget]) -> Bool in targets.contains { now.contains($0) } }
        }
        let gate = IntakeGate(
            maxHold: maxHold, behind: test,
            schedule: { (delay: Duration, body: @escaping @Sendable () -> Void) in
                let ms = Int(delay / .milliseconds(1))
                DispatchQueue.global().asyncAfter(deadline: .now() + .milliseconds(ms), execute: body)
            })
        return (gate, behind)
    }

    func testAnswersAtOnceWhenNothingIsBehind() {
        let (gate, _) = makeGate(maxHold: .seconds(10))
        let answered = NIOLockedValueBox(0)
        gate.answer(for: [a]) { answered.withLockedValue { $0 += 1 } }
        XCTAssertEqual(answered.withLockedValue { $0 }, 1)
        XCTAssertEqual(gate.heldCount, 0)
    }

    /// Only the requests of a destination that is behind wait, in order, until it catches up.
    func testHoldsOnlyTheDestinationThatIsBehindUntilItCatchesUp() {
        let (gate, behind) = makeGate(maxHold: .seconds(10))
        behind.withLockedValue { $0 = [a] }
        let answered = NIOLockedValueBox<[String]>([])
        gate.answer(for: [a]) { answered.withLockedValue { $0.append("a1") } }
        gate.answer(for: [b]) { answered.withLockedValue { $0.append("b1") } }
        gate.answer(for: [a]) { answered.withLockedValue { $0.append("a2") } }
        XCTAssertEqual(answered.withLockedValue { $0 }, ["b1"], "b is not behind")
        XCTAssertEqual(gate.heldCount, 2)
        gate.release()
        XCTAssertEqual(gate.heldCount, 2, "still behind")
        behind.withLockedValue { $0 = [] }
        gate.release()
        XCTAssertEqual(answered.withLockedValue { $0 }, ["b1", "a1", "a2"])
        XCTAssertEqual(gate.heldCount, 0)
    }

    /// A request is answered after `maxHold` however far behind its destination stays.
    func testAnswersAfterTheLongestHold() async throws {
        let (gate, behind) = makeGate(maxHold: .milliseconds(100))
        behind.withLockedValue { $0 = [a] }
        let answered = NIOLockedValueBox<ContinuousClock.Instant?>(nil)
        let start = ContinuousClock.now
        gate.answer(for: [a]) { answered.withLockedValue { $0 = .now } }
        for _ in 0..<200 where answered.withLockedValue({ $0 }) == nil { try await Task.sleep(for: .milliseconds(5)) }
        let at = try XCTUnwrap(answered.withLockedValue { $0 }, "answered")
        XCTAssertGreaterThanOrEqual(at - start, .milliseconds(100))
        XCTAssertEqual(gate.heldCount, 0)
    }

    /// A zero `maxHold` turns holding off.
    func testAZeroHoldNeverHolds() {
        let (gate, behind) = makeGate(maxHold: .zero)
        behind.withLockedValue { $0 = [a] }
        let answered = NIOLockedValueBox(0)
        gate.answer(for: [a]) { answered.withLockedValue { $0 += 1 } }
        XCTAssertEqual(answered.withLockedValue { $0 }, 1)
    }

    // MARK: - Through the sink and the feeder

    func makeSink(tenants names: [String], window: Int, freshMaxBytes: Int, maxHold: Duration = .seconds(30)) throws
        -> (SpoolingSink, RouterLink)
    {
        let config = try SluiceConfig.parse(
            yaml: "tenants:\n"
                + names.map {
                    """
                      \($0):
                        api_key: \($0)-key
                        api_secret: \($0)-secret
                        destinations:
                          main: {kind: kafka, bootstrap_servers: dev, plaintext: true, topic: t-\($0)}

                    """
                }.joined())
        let tenants = Tenants(config)
        let spool = try Spool(directory: dir, maxBytes: 1 << 24, freshMaxBytes: freshMaxBytes)
        let link = RouterLink(
            spool: spool, tenants: tenants, window: window, maxHold: maxHold, holdBytes: freshMaxBytes / 2, logger: Logger(label: "test"))
        return (SpoolingSink(spool: spool, link: link, tenants: tenants, logger: Logger(label: "test")), link)
    }

    func ready(_ link: RouterLink, _ peer: FramePeer) async throws {
        var outputs = Frame(type: .outputs)
        outputs.payload = ByteBuffer(string: #"{"ready":true,"outputs":{"kafka-out":1}}"#)
        try await link.received(outputs, from: peer)
    }

    /// Submits one batch of about `bytes` for `tenant`; the returned box counts its answers.
    func submit(_ sink: SpoolingSink, tenant: String, bytes: Int = 1_000) -> NIOLockedValueBox<[SubmitOutcome]> {
        let answers = NIOLockedValueBox<[SubmitOutcome]>([])
        let body = "{\"p\":\"" + String(repeating: "x", count: bytes - 8) + "\"}"
        sink.submit(tenant: tenant, batches: [ValidatedBatch(bytes: ByteBuffer(string: body), mpid: nil, eventCount: 1)]) {
            outcome in answers.withLockedValue { $0.append(outcome) }
        }
        return answers
    }

    func eventually(_ condition: () -> Bool) async throws {
        for _ in 0..<300 where !condition() { try await Task.sleep(for: .milliseconds(10)) }
    }

    func batches(_ peer: FramePeer) async throws -> [Frame] {
        try await Task.sleep(for: .milliseconds(50))
        return peer.takeQueued().filter { $0.type == .batch }
    }

    /// Makes tenant `tenant`'s destination flow: one batch sent and acked.
    func flowing(_ sink: SpoolingSink, _ link: RouterLink, _ peer: FramePeer, tenant: String) async throws {
        let answer = submit(sink, tenant: tenant)
        try await eventually { answer.withLockedValue { !$0.isEmpty } }
        let sent = try await batches(peer)
        XCTAssertEqual(sent.count, 1)
        for frame in sent { try await link.received(.ack(frame.id), from: peer) }
    }

    /// Tenant a's destination flowing (one batch acked), then `count` more submitted: every one
    /// stored, some of the answers held.
    func heldBehind(
        tenants: [String] = ["a"], window: Int, freshMaxBytes: Int, maxHold: Duration = .seconds(30), count: Int
    ) async throws -> (SpoolingSink, RouterLink, FramePeer, [NIOLockedValueBox<[SubmitOutcome]>]) {
        let (sink, link) = try makeSink(tenants: tenants, window: window, freshMaxBytes: freshMaxBytes, maxHold: maxHold)
        let peer = FramePeer()
        await link.connected(peer)
        try await ready(link, peer)
        try await flowing(sink, link, peer, tenant: "a")
        let answers = (0..<count).map { _ in submit(sink, tenant: "a") }
        func unanswered() -> Int { answers.filter { $0.withLockedValue { $0.isEmpty } }.count }
        try await eventually { link.gate.heldCount > 0 && unanswered() == link.gate.heldCount }
        XCTAssertGreaterThan(link.gate.heldCount, 0, "a's destination is behind: its answers wait")
        XCTAssertEqual(link.gate.heldCount, unanswered(), "every other one answered")
        return (sink, link, peer, answers)
    }

    /// While the router is connected and ready, a tenant whose destination flows but has more
    /// waiting in the feeder's memory than `holdBytes` (half of it here) waits for its answers (the batches are
    /// stored all the same); as the router takes them, the answers come. Another tenant is
    /// answered at once.
    func testAnswersWaitWhileTheirDestinationFallsBehindAndAcksReleaseThem() async throws {
        let (sink, link, peer, answers) = try await heldBehind(tenants: ["a", "b"], window: 2, freshMaxBytes: 16_000, count: 14)
        func unanswered() -> Int { answers.filter { $0.withLockedValue { $0.isEmpty } }.count }
        let other = submit(sink, tenant: "b")
        try await eventually { other.withLockedValue { !$0.isEmpty } }
        XCTAssertEqual(other.withLockedValue { $0 }, [.accepted], "b's destination is not behind")
        // The router takes a's batches: as they go out of memory, the answers come.
        while unanswered() > 0 {
            let sent = try await batches(peer)
            XCTAssertFalse(sent.isEmpty, "something is in flight while answers wait")
            for frame in sent { try await link.received(.ack(frame.id), from: peer) }
        }
        XCTAssertTrue(answers.allSatisfy { $0.withLockedValue { $0 } == [.accepted] })
        XCTAssertEqual(link.gate.heldCount, 0)
    }

    /// Nothing is held while the router is not ready, and a destination the router refuses (it
    /// is then paused) holds no one: its tenant's held answers come at once, and new ones are not
    /// held while it is paused.
    func testARefusedDestinationOrARouterNotReadyHoldsNoOne() async throws {
        let (sink, link) = try makeSink(tenants: ["a"], window: 2, freshMaxBytes: 16_000)
        let peer = FramePeer()
        await link.connected(peer)
        try await flowing(sink, link, peer, tenant: "a")
        var answers: [NIOLockedValueBox<[SubmitOutcome]>] = []
        for _ in 0..<14 { answers.append(submit(sink, tenant: "a")) }
        try await eventually { answers.allSatisfy { $0.withLockedValue { !$0.isEmpty } } }
        XCTAssertEqual(link.gate.heldCount, 0, "the router has not said its outputs are ready: nothing is held")

        try await ready(link, peer)
        let sent = try await batches(peer)
        XCTAssertEqual(sent.count, 2)
        try await link.received(.ack(sent[0].id), from: peer)
        let held = submit(sink, tenant: "a")
        try await eventually { link.gate.heldCount > 0 }
        XCTAssertEqual(held.withLockedValue { $0 }, [], "ready now, and behind")
        try await link.received(.nack(sent[1].id, reason: "router backlog is full", retryable: true), from: peer)
        try await eventually { held.withLockedValue { !$0.isEmpty } }
        XCTAssertEqual(held.withLockedValue { $0 }, [.accepted], "a paused destination holds no one")
        let during = submit(sink, tenant: "a")
        try await eventually { during.withLockedValue { !$0.isEmpty } }
        XCTAssertEqual(during.withLockedValue { $0 }, [.accepted])
    }

    /// A destination that stops answering (deliveries in flight, no ack for a second: down, or
    /// its output gone) no longer holds its tenant's answers.
    func testADestinationThatStopsAnsweringHoldsNoOne() async throws {
        let (sink, _, _, answers) = try await heldBehind(window: 2, freshMaxBytes: 16_000, count: 14)
        let start = ContinuousClock.now
        try await eventually { answers.allSatisfy { $0.withLockedValue { !$0.isEmpty } } }
        XCTAssertTrue(answers.allSatisfy { $0.withLockedValue { $0 } == [.accepted] })
        XCTAssertLessThan(ContinuousClock.now - start, .seconds(3), "released once it stalled, long before the 30 s hold")
        let later = submit(sink, tenant: "a")
        try await eventually { later.withLockedValue { !$0.isEmpty } }
        XCTAssertEqual(later.withLockedValue { $0 }, [.accepted], "not held while it stalls")
    }

    /// A request is not held longer than `maxHold` through the sink either.
    func testTheSinkAnswersAfterTheLongestHold() async throws {
        let (_, _, _, answers) = try await heldBehind(window: 1, freshMaxBytes: 8_000, maxHold: .milliseconds(150), count: 10)
        let start = ContinuousClock.now
        try await eventually { answers.allSatisfy { $0.withLockedValue { !$0.isEmpty } } }
        XCTAssertTrue(answers.allSatisfy { $0.withLockedValue { $0 } == [.accepted] }, "answered once held long enough, no ack needed")
        XCTAssertLessThan(ContinuousClock.now - start, .milliseconds(900), "after the 150 ms hold, before the destination counts as stalled")
    }
}
