import Foundation
import Logging
import NIOCore
import NIOPosix
import XCTest

@testable import Shared
@testable import ingest

/// The feeder's flow control towards the router, through its public surface: deliveries sent,
/// answers received.
final class RouterLinkTests: SpoolTestCase {
    let target = DeliveryTarget(tenant: "acme", destination: "main")

    func makeLink(
        window: Int, totalWindowBytes: Int = 8 << 20, destinations: [String] = ["main"], loop: EventLoop? = nil,
        freshMaxBytes: Int = 8 << 20
    ) throws -> (Spool, RouterLink) {
        let lines = destinations.map { "          \($0): {kind: kafka, bootstrap_servers: dev, plaintext: true, topic: t-\($0)}" }
        let config = try SluiceConfig.parse(
            yaml: """
                tenants:
                  acme:
                    api_key: acme-key
                    api_secret: acme-secret
                    destinations:
                \(lines.joined(separator: "\n"))
                """)
        let spool = try Spool(directory: dir, maxBytes: 1 << 24, freshMaxBytes: freshMaxBytes)
        let link = RouterLink(
            spool: spool, tenants: Tenants(config), window: window, totalWindowBytes: totalWindowBytes, loop: loop,
            logger: Logger(label: "test"))
        return (spool, link)
    }

    func sent(_ peer: FramePeer, atLeast count: Int) async throws -> [Frame] {
        var frames: [Frame] = []
        for _ in 0..<300 {
            frames += peer.takeQueued()
            if frames.count >= count { break }
            try await Task.sleep(for: .milliseconds(10))
        }
        return frames.filter { $0.type == .batch }
    }

    /// A refusal for lack of room halves the destination's window once for the whole burst that
    /// was in flight (the router refuses everything after the refused delivery), the destination
    /// pauses, then sends again from the refused one with the smaller window; acks grow it back.
    func testRefusalsShrinkTheWindowAndAcksGrowIt() async throws {
        try await refusalsShrinkTheWindowAndAcksGrowIt(loop: nil)
    }

    /// The same with passes that send from memory running on an event loop (as in ingest).
    func testRefusalsShrinkTheWindowAndAcksGrowItWithPassesOnALoop() async throws {
        try await refusalsShrinkTheWindowAndAcksGrowIt(loop: MultiThreadedEventLoopGroup.singleton.next())
    }

    func refusalsShrinkTheWindowAndAcksGrowIt(loop: EventLoop?) async throws {
        let (spool, link) = try makeLink(window: 8, loop: loop)
        for i in 0..<80 {
            _ = try await spool.append(
                tenant: "acme", destinations: ["main"],
                batches: [ValidatedBatch(bytes: ByteBuffer(string: "{\"n\":\(i)}"), mpid: nil, eventCount: 1)])
        }
        let peer = FramePeer()
        await link.connected(peer)
        let first = try await sent(peer, atLeast: 8)
        XCTAssertEqual(first.count, 8, "the whole window goes")
        // The router takes two and refuses the rest, in order.
        try await link.received(.ack(first[0].id), from: peer)
        try await link.received(.ack(first[1].id), from: peer)
        for frame in first[2...] {
            try await link.received(.nack(frame.id, reason: "router backlog is full", retryable: true), from: peer)
        }
        // What the two acks let through meanwhile is refused too (it comes after a refused one).
        try await Task.sleep(for: .milliseconds(50))
        for frame in peer.takeQueued() where frame.type == .batch {
            try await link.received(.nack(frame.id, reason: "router backlog is full", retryable: true), from: peer)
        }
        XCTAssertEqual(link.window(of: target), 4, "8 + 2 acks capped at 8, halved once for the burst")
        let again = try await sent(peer, atLeast: 4)
        XCTAssertEqual(again.map(\.id), Array(first[2..<6].map(\.id)), "after the pause, from the refused one, 4 at a time")
        for frame in again { try await link.received(.ack(frame.id), from: peer) }
        XCTAssertEqual(link.window(of: target), 5, "one more per window's worth of acks")
        var acks = 0
        while link.window(of: target) < 8 {
            let frames = try await sent(peer, atLeast: 1)
            XCTAssertFalse(frames.isEmpty)
            for frame in frames where link.window(of: target) < 8 {
                try await link.received(.ack(frame.id), from: peer)
                acks += 1
            }
        }
        XCTAssertEqual(acks, 5 + 6 + 7, "up to the configured window")
        // A refusal after the pause is a new cut.
        try await Task.sleep(for: .milliseconds(50))
        let more = peer.takeQueued().filter { $0.type == .batch }
        XCTAssertFalse(more.isEmpty)
        try await link.received(.nack(more[0].id, reason: "router backlog is full", retryable: true), from: peer)
        XCTAssertEqual(link.window(of: target), 4)
    }

    func append(_ count: Int, bytes: Int, to destinations: [String], in spool: Spool) async throws {
        let body = "{\"p\":\"" + String(repeating: "x", count: bytes - 8) + "\"}"
        for _ in 0..<count {
            _ = try await spool.append(
                tenant: "acme", destinations: destinations,
                batches: [ValidatedBatch(bytes: ByteBuffer(string: body), mpid: nil, eventCount: 1)])
        }
    }

    /// The link's byte window spans all destinations: once it is full, a destination sends only
    /// when it has nothing in flight (one delivery: none is ever stopped by the others), and
    /// everything still goes, once.
    func testTheLinksWindowBoundsWhatAllDestinationsHaveInFlight() async throws {
        let names = (0..<10).map { "d\($0)" }
        let (spool, link) = try makeLink(window: 64, totalWindowBytes: 10_000, destinations: names)
        try await append(5, bytes: 1_000, to: names, in: spool)
        let peer = FramePeer()
        await link.connected(peer)
        var frames = try await sent(peer, atLeast: 18)
        try await Task.sleep(for: .milliseconds(50))
        frames += peer.takeQueued().filter { $0.type == .batch }
        XCTAssertEqual(frames.count, 18, "two destinations fill the 10,000 bytes, the eight others one each")
        XCTAssertEqual(Set(frames.compactMap(\.destination)).count, 10)
        var delivered: [UInt64] = []
        while let frame = frames.first {
            frames.removeFirst()
            try await link.received(.ack(frame.id), from: peer)
            delivered.append(frame.id)
            XCTAssertLessThanOrEqual(link.inFlight, 18)
            try await Task.sleep(for: .milliseconds(2))
            frames += peer.takeQueued().filter { $0.type == .batch }
        }
        XCTAssertEqual(delivered.count, 50)
        XCTAssertEqual(Set(delivered).count, 50)
        XCTAssertEqual(link.inFlight, 0)
    }

    /// A refusal halves the link's window too (once per burst); acks grow it back by an eighth per
    /// window's worth.
    func testRefusalsHalveTheLinksWindow() async throws {
        let (spool, link) = try makeLink(window: 64, totalWindowBytes: 10_000)
        try await append(60, bytes: 1_000, to: ["main"], in: spool)
        let peer = FramePeer()
        await link.connected(peer)
        let first = try await sent(peer, atLeast: 10)
        XCTAssertEqual(first.count, 10)
        for frame in first { try await link.received(.nack(frame.id, reason: "router backlog is full", retryable: true), from: peer) }
        let again = try await sent(peer, atLeast: 5)
        XCTAssertEqual(again.map(\.id), Array(first[0..<5].map(\.id)), "after the pause, from the refused one, in 5,000 bytes")
        for frame in again { try await link.received(.ack(frame.id), from: peer) }
        let grown = try await sent(peer, atLeast: 5)
        try await Task.sleep(for: .milliseconds(50))
        XCTAssertEqual(grown.count + peer.takeQueued().filter { $0.type == .batch }.count, 5, "5,625 bytes: still 5 of 1,000")
        XCTAssertEqual(link.inFlight, 5)
    }

    /// After a refusal the link's window grows back fast while well below the size it was refused
    /// at, then slowly near it (and past it, should the router take more now).
    func testTheLinksWindowGrowsSlowlyNearWhereItWasRefused() {
        var w = RouterLink.LinkWindow(maximum: 64_000)
        func growth(_ count: Int) -> [Int] {
            (0..<count).map { _ in
                let before = w.bytes
                w.acked(before)
                return w.bytes - before
            }
        }
        let now = ContinuousClock.now
        w.refused(at: now, pause: .seconds(1))
        XCTAssertEqual(w.bytes, 32_000)
        XCTAssertEqual(growth(6), [4_000, 4_500, 5_062, 5_695, 6_407, 901], "an eighth below 56,000, then a sixty-fourth")
        for _ in 0..<20 where w.bytes < 64_000 { w.acked(w.bytes) }
        XCTAssertEqual(w.bytes, 64_000, "back to the maximum in the end")
        // Refused at a smaller size: growth slows earlier (7/8 of 32,000).
        w.refused(at: now + .seconds(10), pause: .seconds(1))
        w.refused(at: now + .milliseconds(10_500), pause: .seconds(1))
        XCTAssertEqual(w.bytes, 32_000, "the same burst: one cut")
        w.refused(at: now + .seconds(20), pause: .seconds(1))
        XCTAssertEqual(w.bytes, 16_000)
        XCTAssertEqual(growth(6), [2_000, 2_250, 2_531, 2_847, 3_203, 450])
    }

    /// Every batch reaches every one of its destinations once, in order, while the memory for
    /// just-spooled deliveries is too small to hold them (read back from the spool, cut by the
    /// link's byte window) and the router refuses now and then (it then refuses everything after
    /// the refused one until that one comes again, as the router does).
    func testEveryDeliveryGoesOnceAndInOrderUnderMemoryPressureAndRefusals() async throws {
        let names = ["d0", "d1", "d2", "d3"]
        let (spool, link) = try makeLink(
            window: 8, totalWindowBytes: 6_000, destinations: names, loop: MultiThreadedEventLoopGroup.singleton.next(),
            freshMaxBytes: 3_000)
        let peer = FramePeer()
        await link.connected(peer)
        var random = SystemRandomNumberGenerator()
        var expected: [String: [Int]] = [:]
        var received: [String: [Int]] = [:]
        var refused: [String: UInt64] = [:]
        let batches = 200
        var appended = 0
        let deadline = ContinuousClock.now + .seconds(60)
        while ContinuousClock.now < deadline {
            if appended < batches {
                let to = names.filter { _ in Bool.random(using: &random) }
                let body = "{\"n\":\(appended),\"p\":\"" + String(repeating: "x", count: Int.random(in: 10...900, using: &random)) + "\"}"
                _ = try await spool.append(
                    tenant: "acme", destinations: to, batches: [ValidatedBatch(bytes: ByteBuffer(string: body), mpid: nil, eventCount: 1)])
                for d in to { expected[d, default: []].append(appended) }
                link.pump(to.map { DeliveryTarget(tenant: "acme", destination: $0) })  // as ingest's sink does
                appended += 1
            }
            for frame in peer.takeQueued() where frame.type == .batch {
                let d = try XCTUnwrap(frame.destination)
                if let first = refused[d], frame.id != first {
                    try await link.received(.nack(frame.id, reason: "router backlog is full", retryable: true), from: peer)
                    continue
                }
                refused[d] = nil
                if Int.random(in: 0..<40, using: &random) == 0 {
                    refused[d] = frame.id
                    try await link.received(.nack(frame.id, reason: "router backlog is full", retryable: true), from: peer)
                    continue
                }
                let n = try XCTUnwrap(JSONValue.parse(try XCTUnwrap(frame.payload))["n"]).description
                received[d, default: []].append(try XCTUnwrap(Int(n)))
                try await link.received(.ack(frame.id), from: peer)
            }
            if appended == batches {
                if received == expected { break }
                try await Task.sleep(for: .milliseconds(5))
            }
        }
        XCTAssertEqual(received, expected, "each batch once, in order, for each of its destinations")
        XCTAssertGreaterThan(spool.readBack.withLockedValue { $0 }, 0, "memory was too small: some were read back")
    }
}
