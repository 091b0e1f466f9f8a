import Foundation
import NIOCore
import Shared
import XCTest

@testable import ingest

/// What the tests of the spool and its feeder share: a spool directory of their own per test,
/// removed after it, and batches made from text.
class SpoolTestCase: XCTestCase {
    var dir = ""
    override func setUp() { dir = NSTemporaryDirectory() + "spool-\(UUID().uuidString)" }
    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    func batch(_ text: String, mpid: String? = nil) -> ValidatedBatch {
        ValidatedBatch(bytes: ByteBuffer(string: text), mpid: mpid, eventCount: 0)
    }
}
