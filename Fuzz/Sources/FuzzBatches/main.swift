import FuzzDriver
import NIOCore
import Shared

/// The batch validator must never crash; an accepted batch keeps its exact bytes and its MPID is
/// a canonical signed 64-bit integer.
func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let buffer = ByteBuffer(bytes: UnsafeBufferPointer(start: data, count: size))
    let validator = BatchValidator(maxBatchBytes: 1 << 20)
    if let batch = try? validator.validate(buffer) {
        precondition(batch.bytes == buffer, "accepted batch bytes changed")
        if let mpid = batch.mpid { precondition(Int64(mpid).map(String.init) == mpid, "MPID is not canonical") }
        var settings = KafkaConnectionSettings()
        settings.sendAsBatch = false
        if let tree = try? JSONValue.parse(buffer) {
            for message in settings.apply(to: tree, original: buffer, receivedAt: 0).messages {
                precondition((try? JSON.validate(message)) != nil, "settings produced invalid JSON")
            }
        }
    }
    _ = try? validator.validateBulk(buffer, maxBatches: 100)
    return 0
}

runFuzzer { data, size in fuzz(data!, size) }
