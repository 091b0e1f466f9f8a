import NIOCore
import NIOHTTP1
import Shared

/// An error answer in mParticle's shape: `{"errors":[{"code":"…","message":"…"}]}`.
struct APIError: Error {
    var status: HTTPResponseStatus
    var code: String
    var message: String
    var retryAfterSeconds: Int?

    static func badRequest(_ message: String) -> APIError { APIError(status: .badRequest, code: "BAD_REQUEST", message: message) }

    static let missingCredentials = APIError(
        status: .unauthorized, code: "UNAUTHORIZED",
        message: "authentication is missing: send HTTP Basic auth with your API key and secret")
    static let malformedCredentials = APIError(
        status: .unauthorized, code: "UNAUTHORIZED",
        message: "the Authorization header is not HTTP Basic auth with base64(api_key:api_secret)")
    static let invalidCredentials = APIError(
        status: .forbidden, code: "FORBIDDEN", message: "the API key and secret are not valid")
    static func tooLarge(_ message: String) -> APIError {
        APIError(status: .payloadTooLarge, code: "PAYLOAD_TOO_LARGE", message: message)
    }
    static func unsupportedMediaType(_ message: String) -> APIError {
        APIError(status: .unsupportedMediaType, code: "UNSUPPORTED_MEDIA_TYPE", message: message)
    }
    static func unavailable(_ message: String) -> APIError {
        APIError(status: .serviceUnavailable, code: "SERVICE_UNAVAILABLE", message: message, retryAfterSeconds: 1)
    }
    static func tooManyRequests(retryAfterSeconds: Int) -> APIError {
        APIError(
            status: .tooManyRequests, code: "TOO_MANY_REQUESTS",
            message: "the spool is full; retry after \(retryAfterSeconds) seconds", retryAfterSeconds: retryAfterSeconds)
    }
    static func internalError(_ message: String) -> APIError {
        APIError(status: .internalServerError, code: "INTERNAL_ERROR", message: message)
    }

    var answer: HTTPAnswer {
        var body = ByteBuffer()
        JSONValue.object([
            .init("errors", .array([.object([.init("code", .string(code)), .init("message", .string(message))])]))
        ]).write(into: &body)
        return HTTPAnswer(status: status, contentType: "application/json", body: body, retryAfterSeconds: retryAfterSeconds)
    }
}
