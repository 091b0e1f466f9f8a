import Foundation
import NIOCore
import XCTest

@testable import ingest

/// The pump's memory of just-spooled deliveries: what it answers must be what the spool would.
final class FreshDeliveriesTests: XCTestCase {
    let a = DeliveryTarget(tenant: "acme", destination: "a")
    let b = DeliveryTarget(tenant: "acme", destination: "b")

    func delivery(_ id: Int64, _ target: DeliveryTarget, bytes: Int = 10) -> SpooledDelivery {
        SpooledDelivery(id: id, batchID: id, target: target, key: nil, payload: ByteBuffer(repeating: 0x7B, count: bytes))
    }

    func testAnswersFromMemoryOnlyAboveTheLanesFloor() {
        var fresh = FreshDeliveries(lastDeliveryID: 100)
        XCTAssertEqual(fresh.waiting(a, after: 100, limit: 10)?.map(\.id), [], "nothing newer than the spool's last id")
        XCTAssertNil(fresh.waiting(a, after: 50, limit: 10), "older ones are only in the spool")
        for (id, target) in [(101, a), (102, b), (103, a), (104, a)] { fresh.inserted(delivery(Int64(id), target)) }
        XCTAssertEqual(fresh.waiting(a, after: 100, limit: 10)?.map(\.id), [101, 103, 104])
        XCTAssertEqual(fresh.waiting(a, after: 100, limit: 2)?.map(\.id), [101, 103])
        XCTAssertEqual(fresh.waiting(b, after: 100, limit: 10)?.map(\.id), [102])
        XCTAssertEqual(fresh.waiting(a, after: 100, limit: 10, maxBytes: 25)?.map(\.id), [101, 103], "two of 10 bytes fit in 25")
        XCTAssertEqual(fresh.waiting(a, after: 100, limit: 10, maxBytes: 5)?.map(\.id), [101], "at least one")

        fresh.sent(a, upTo: 103)
        XCTAssertEqual(fresh.waiting(a, after: 103, limit: 10)?.map(\.id), [104])
        XCTAssertNil(fresh.waiting(a, after: 100, limit: 10), "a refusal sends again from the spool (the cursor went back)")
        XCTAssertEqual(fresh.heldBytes, 2 * FreshDeliveries.cost(delivery(0, a)), "what was sent is let go")

        fresh.finished(104, target: a)
        XCTAssertEqual(fresh.waiting(a, after: 103, limit: 10)?.map(\.id), [], "a finished delivery is never sent again")
    }

    func testDeliveriesThisMemoryWasNotToldOfAreLeftToTheSpool() {
        var fresh = FreshDeliveries(lastDeliveryID: 0)
        fresh.inserted(delivery(1, a))
        fresh.sent(a, upTo: 1)
        // Id 2 was used up without this memory hearing of it (a log write that failed); the next is 3.
        fresh.inserted(delivery(3, a))
        XCTAssertNil(fresh.waiting(a, after: 1, limit: 10), "delivery 2 is not in memory: read the spool")
        XCTAssertEqual(fresh.waiting(a, after: 2, limit: 10)?.map(\.id), [3])
        XCTAssertEqual(fresh.waiting(b, after: 2, limit: 10)?.map(\.id), [])
    }

    func testASentDeliveryReadFromTheSpoolIsNotRememberedAgain() {
        var fresh = FreshDeliveries(lastDeliveryID: 0)
        // The pump read 1 from the spool and sent it before the writer told this memory about it.
        fresh.sent(a, upTo: 1)
        fresh.inserted(delivery(1, a))
        fresh.inserted(delivery(2, a))
        XCTAssertEqual(fresh.waiting(a, after: 1, limit: 10)?.map(\.id), [2])
    }

    func testMemoryIsBoundedByEvictingTheLargestLanesOldest() {
        let unit = FreshDeliveries.cost(delivery(0, a, bytes: 20))
        var fresh = FreshDeliveries(lastDeliveryID: 0, maxBytes: 5 * unit)
        for id in 1...8 { fresh.inserted(delivery(Int64(id), a, bytes: 20)) }  // a destination that is down
        fresh.inserted(delivery(9, b, bytes: 20))
        XCTAssertLessThanOrEqual(fresh.heldBytes, 5 * unit)
        XCTAssertEqual(fresh.waiting(b, after: 0, limit: 10)?.map(\.id), [9], "the others keep their fresh deliveries")
        XCTAssertNil(fresh.waiting(a, after: 0, limit: 10), "the evicted ones come from the spool")
        XCTAssertEqual(fresh.waiting(a, after: 5, limit: 10)?.map(\.id), [6, 7, 8])
        XCTAssertEqual(fresh.floor(of: a), 4, "only the evicted ones (1–4) are to be read back")
        XCTAssertEqual(fresh.floor(of: b), 0)
    }

    func testABatchIsCountedByTheStorageItKeepsAlive() {
        var receive = ByteBuffer(repeating: 0x20, count: 64 << 10)  // a receive buffer
        let batch = receive.readSlice(length: 11 << 10)!
        var fresh = FreshDeliveries(lastDeliveryID: 0)
        fresh.inserted(SpooledDelivery(id: 1, batchID: 1, target: a, key: nil, payload: batch))
        XCTAssertGreaterThanOrEqual(fresh.heldBytes, 64 << 10)
    }

    /// What a read takes within a byte budget: in order, while the sizes fit, at least one.
    func testAPrefixWithinABudgetOfBytes() {
        XCTAssertEqual([5, 5, 20, 1].prefix(10, maxBytes: 10) { $0 }, [5, 5], "stops at the first that does not fit")
        XCTAssertEqual([5, 5, 20, 1].prefix(1, maxBytes: 100) { $0 }, [5], "and at the limit")
        XCTAssertEqual([20, 1].prefix(10, maxBytes: 10) { $0 }, [20], "at least one, whatever its size")
        XCTAssertEqual([20, 1].prefix(10, maxBytes: 10, atLeastOne: false) { $0 }, [])
        XCTAssertEqual([20, 1].prefix(10, maxBytes: -5) { $0 }, [20], "even with no room left")
    }
}
