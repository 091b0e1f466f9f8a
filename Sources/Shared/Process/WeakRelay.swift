import Foundation

/// A weak, lock-protected reference: lets callbacks made before an object finished its init
/// reach it later (the producer pool is created in the publisher's init).
public final class WeakRelay<Target: AnyObject>: @unchecked Sendable {
    private let lock = NSLock()
    private weak var _target: Target?
    public init() {}
    public var target: Target? {
        get { lock.withLock { _target } }
        set { lock.withLock { _target = newValue } }
    }
}
