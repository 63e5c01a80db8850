/**
 * The errors the SDK throws. Every answer of the API that is not 2xx is
 * `{"error": {"code", "message"}}` (docs/api.md "Errors"); it becomes a
 * {@link HyperfleetError} of the class for its code, so callers can either
 * branch on `err.code` or catch a class (`err instanceof NotFoundError`).
 */
import { ERROR_CODES, type ErrorCode } from "./generated/openapi.js";

export type { ErrorCode };

/** An error answered by the API, or met while talking to it. */
export class HyperfleetError extends Error {
  /** The API's error code (`NOT_FOUND`, `CONFLICT`, …), or `CONNECTION_ERROR`. */
  readonly code: ErrorCode | "CONNECTION_ERROR" | (string & {});
  /** The HTTP status; `undefined` when no answer came (connection) or for an error inside a stream. */
  readonly status: number | undefined;

  constructor(code: string, message: string, status?: number, options?: { cause?: unknown }) {
    super(message, options);
    this.name = new.target.name;
    this.code = code;
    this.status = status;
  }
}

/** 401: no usable key. */
export class UnauthorizedError extends HyperfleetError {}
/** 403: the key lacks the scope. */
export class ForbiddenError extends HyperfleetError {}
/** 403: the tenant's quota does not allow the new machine. */
export class QuotaExceededError extends HyperfleetError {}
/** 404: no such machine (for this tenant), key, path or route. */
export class NotFoundError extends HyperfleetError {}
/** 405: wrong method for the path. */
export class MethodNotAllowedError extends HyperfleetError {}
/** 400: values out of bounds, unknown fields, bad query parameters. */
export class ValidationError extends HyperfleetError {}
/** 400: malformed request; the guest refused a file operation. */
export class BadRequestError extends HyperfleetError {}
/** 413: body over 1 MiB, or a file too large for the JSON form. */
export class PayloadTooLargeError extends HyperfleetError {}
/** 409: the machine's state does not allow the request now. */
export class InvalidStateError extends HyperfleetError {}
/** 409: name already used; revoking the last admin key. */
export class ConflictError extends HyperfleetError {}
/** 409: the host cannot promise the guest's memory now. */
export class InsufficientCapacityError extends HyperfleetError {}
/** 504: the deadline of a waiting request passed (the operation goes on). */
export class TimeoutError extends HyperfleetError {}
/** 500: the machine failed while carrying out the request. */
export class RuntimeError extends HyperfleetError {}
/** 502: the guest agent cannot be reached. */
export class AgentError extends HyperfleetError {}
/** 502: proxy only: the guest port refused or broke off. */
export class BadGatewayError extends HyperfleetError {}
/** 429: too many guest requests in progress; retry when one finished. */
export class TooManyRequestsError extends HyperfleetError {}
/** 503: the server is shutting down. */
export class UnavailableError extends HyperfleetError {}
/** 507: the disk holding the database is full; nothing changed. */
export class InsufficientStorageError extends HyperfleetError {}
/** 500: a bug or host failure; details in the server log. */
export class InternalError extends HyperfleetError {}
/** The server could not be reached, or the connection broke. */
export class ConnectionError extends HyperfleetError {}

/** The class for each API error code; a test checks it covers the spec's `ErrorCode`. */
export const ERROR_CLASSES = {
  UNAUTHORIZED: UnauthorizedError,
  FORBIDDEN: ForbiddenError,
  QUOTA_EXCEEDED: QuotaExceededError,
  NOT_FOUND: NotFoundError,
  METHOD_NOT_ALLOWED: MethodNotAllowedError,
  VALIDATION_ERROR: ValidationError,
  BAD_REQUEST: BadRequestError,
  PAYLOAD_TOO_LARGE: PayloadTooLargeError,
  INVALID_STATE: InvalidStateError,
  CONFLICT: ConflictError,
  INSUFFICIENT_CAPACITY: InsufficientCapacityError,
  TIMEOUT: TimeoutError,
  RUNTIME_ERROR: RuntimeError,
  AGENT_ERROR: AgentError,
  BAD_GATEWAY: BadGatewayError,
  TOO_MANY_REQUESTS: TooManyRequestsError,
  UNAVAILABLE: UnavailableError,
  INSUFFICIENT_STORAGE: InsufficientStorageError,
  INTERNAL_ERROR: InternalError,
} as const satisfies Record<ErrorCode, typeof HyperfleetError>;

/** The error for `code` (a known class, else the base class). */
export function errorFor(code: string, message: string, status?: number): HyperfleetError {
  const cls = (ERROR_CLASSES as Record<string, typeof HyperfleetError>)[code] ?? HyperfleetError;
  return new cls(code, message, status);
}

/** The error for a non-2xx answer; its body is read (and so consumed). */
export async function errorFromResponse(resp: Response): Promise<HyperfleetError> {
  const text = await resp.text().catch(() => "");
  try {
    const body = JSON.parse(text) as { error?: { code?: unknown; message?: unknown } };
    const { code, message } = body.error ?? {};
    if (typeof code === "string" && typeof message === "string") {
      return errorFor(code, message, resp.status);
    }
  } catch {
    // Not the API's envelope (a proxy in between?): report what came.
  }
  const fallback = STATUS_CODES[resp.status] ?? "INTERNAL_ERROR";
  return errorFor(fallback, `HTTP ${resp.status}: ${text.slice(0, 500) || resp.statusText}`, resp.status);
}

const STATUS_CODES: Record<number, ErrorCode> = {
  400: "BAD_REQUEST",
  401: "UNAUTHORIZED",
  403: "FORBIDDEN",
  404: "NOT_FOUND",
  405: "METHOD_NOT_ALLOWED",
  409: "CONFLICT",
  413: "PAYLOAD_TOO_LARGE",
  429: "TOO_MANY_REQUESTS",
  502: "BAD_GATEWAY",
  503: "UNAVAILABLE",
  504: "TIMEOUT",
  507: "INSUFFICIENT_STORAGE",
};

/** Every code in the spec, for tests and for callers that enumerate them. */
export const API_ERROR_CODES: readonly ErrorCode[] = ERROR_CODES;
