import Foundation
import Logging
import NIOCore
import NIOPosix
import XCTest

@testable import Shared
@testable import ingest

/// The feeder's flow control towards the router, through its public surface: deliveries sent,
/// answers received.
final class RouterLinkTests: XCTestCase {
    var dir = ""
    override func setUp() { dir = NSTemporaryDirectory() + "link-\(UUID().uuidString)" }
    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    let target = DeliveryTarget(tenant: "acme", destination: "main")

    func makeLink(window: Int, loop: EventLoop? = nil) throws -> (Spool, RouterLink) {
        let config = try SluiceConfig.parse(
            yaml: """
                tenants:
                  acme:
                    api_key: acme-key
                    api_secret: acme-secret
                    destinations:
                      main: {kind: kafka, bootstrap_servers: dev, plaintext: true, topic: t}
                """)
        let spool = try Spool(directory: dir, maxBytes: 1 << 24)
        let link = RouterLink(spool: spool, tenants: Tenants(config), window: window, loop: loop, logger: Logger(label: "test"))
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
}
