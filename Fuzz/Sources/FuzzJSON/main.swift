import FuzzDriver
import Foundation
import NIOCore
import Shared

/// The JSON scanner must never crash, and must agree with itself: what it accepts parses into a
/// value whose written form it accepts again, unchanged.
func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let bytes = UnsafeRawBufferPointer(start: data, count: size)
    guard let value = try? JSONValue.parse(bytes) else { return 0 }
    let written = value.jsonBytes
    guard let again = try? JSONValue.parse(written) else { fatalError("accepted, but its written form is rejected") }
    precondition(again == value, "written form parses to another value")
    return 0
}

runFuzzer { data, size in fuzz(data!, size) }
