import Foundation
import NIOConcurrencyHelpers
import NIOCore
import XCTest

@testable import ingest

/// The payload log read back while its writer appends, releases and retires segments (their
/// files deleted or written over as the next segment): a read returns the bytes written at its
/// location or says they are gone — never other bytes, never an I/O error.
final class PayloadLogTests: SpoolTestCase {
    func testReadsRacingRetiredAndReusedSegmentsGetTheirBytesOrMissing() throws {
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        // Small segments: a new one every few records, and the spare reused over and over.
        let log = try PayloadLog(directory: dir, references: [:], applied: 0, segmentBytes: 1024)
        let live = NIOLockedValueBox<[(at: PayloadLocation, byte: UInt8)]>([])
        let done = NIOLockedValueBox(false)
        let tally = NIOLockedValueBox((read: 0, missing: 0, wrong: 0, failed: [String]()))

        let readers = (0..<2).map { _ in
            Thread {
                var rng = SystemRandomNumberGenerator()
                while !done.withLockedValue({ $0 }) {
                    guard let pick = live.withLockedValue({ $0.randomElement(using: &rng) }) else { continue }
                    do {
                        let bytes = try log.read(pick.at)
                        let right = bytes.readableBytes == pick.at.length && bytes.readableBytesView.allSatisfy { $0 == pick.byte }
                        tally.withLockedValue { right ? ($0.read += 1) : ($0.wrong += 1) }
                    } catch PayloadLog.Failure.missing {
                        tally.withLockedValue { $0.missing += 1 }
                    } catch {
                        tally.withLockedValue { $0.failed.append("\(error)") }
                    }
                }
            }
        }
        readers.forEach { $0.start() }
        for i in 0..<4000 {
            let byte = UInt8(i % 251)
            let at = try log.append(ByteBuffer(repeating: byte, count: 300), batches: 1, lastSequence: UInt64(i + 1), durable: false)
            log.applied(upTo: UInt64(i + 1))
            let oldest = live.withLockedValue { l -> PayloadLocation? in
                l.append((PayloadLocation(segment: at.segment, offset: at.offset, length: 300), byte))
                return l.count > 6 ? l.removeFirst().at : nil
            }
            if let oldest { log.release(oldest.segment) }
        }
        done.withLockedValue { $0 = true }
        while readers.contains(where: { !$0.isFinished }) { usleep(1000) }

        let t = tally.withLockedValue { $0 }
        XCTAssertEqual(t.wrong, 0, "reads that returned bytes other than those written")
        XCTAssertEqual(t.failed, [], "reads that failed otherwise")
        XCTAssertGreaterThan(t.read, 0)
    }
}
