//! Every answer the edge makes itself has a stable code (CONTRACT §3, §5): its HTTP
//! status, its machine-readable name and a one-line message. A leaf: it imports nothing
//! of the crate, so access checks, routing, pages and the rescue path can all name a
//! code without depending on each other.

/// Every edge-generated failure, with its status and stable code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    InvalidHost,
    /// A request the edge refuses to forward: ambiguous framing, a NUL in the path,
    /// a target it cannot route (see `crate::hostile`).
    BadRequest,
    /// The request line is too long.
    UriTooLong,
    /// Too many header fields, or too many bytes of them.
    RequestHeaderTooLarge,
    /// The client stopped sending its request body.
    RequestTimeout,
    UnknownHost,
    NotFound,
    PreviewNotFound,
    DomainNotVerified,
    PreviewAuthRequired,
    PreviewTokenInvalid,
    PreviewTokenExpired,
    ShareTokenInvalid,
    ShareTokenExpired,
    SharePasswordRequired,
    TooManyAttempts,
    SandboxUnavailable,
    SandboxStarting,
    UpstreamTimeout,
    NoHealthyInstance,
    ReleaseUnavailable,
    /// A storage object that is missing or private (the two are indistinguishable).
    ObjectNotFound,
    /// The store refused or failed a request for an object.
    StorageUnavailable,
    InternalError,
}

impl ErrorCode {
    /// All codes, for rendering and tests.
    pub const ALL: [ErrorCode; 24] = [
        ErrorCode::InvalidHost,
        ErrorCode::BadRequest,
        ErrorCode::UriTooLong,
        ErrorCode::RequestHeaderTooLarge,
        ErrorCode::RequestTimeout,
        ErrorCode::UnknownHost,
        ErrorCode::NotFound,
        ErrorCode::PreviewNotFound,
        ErrorCode::DomainNotVerified,
        ErrorCode::PreviewAuthRequired,
        ErrorCode::PreviewTokenInvalid,
        ErrorCode::PreviewTokenExpired,
        ErrorCode::ShareTokenInvalid,
        ErrorCode::ShareTokenExpired,
        ErrorCode::SharePasswordRequired,
        ErrorCode::TooManyAttempts,
        ErrorCode::SandboxUnavailable,
        ErrorCode::SandboxStarting,
        ErrorCode::UpstreamTimeout,
        ErrorCode::NoHealthyInstance,
        ErrorCode::ReleaseUnavailable,
        ErrorCode::ObjectNotFound,
        ErrorCode::StorageUnavailable,
        ErrorCode::InternalError,
    ];

    /// HTTP status.
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::InvalidHost | ErrorCode::BadRequest => 400,
            ErrorCode::RequestTimeout => 408,
            ErrorCode::UriTooLong => 414,
            ErrorCode::RequestHeaderTooLarge => 431,
            ErrorCode::UnknownHost | ErrorCode::PreviewNotFound | ErrorCode::NotFound | ErrorCode::ObjectNotFound => 404,
            ErrorCode::DomainNotVerified => 421,
            ErrorCode::PreviewAuthRequired
            | ErrorCode::PreviewTokenInvalid
            | ErrorCode::PreviewTokenExpired
            | ErrorCode::ShareTokenInvalid
            | ErrorCode::ShareTokenExpired
            | ErrorCode::SharePasswordRequired => 401,
            ErrorCode::TooManyAttempts => 429,
            ErrorCode::SandboxUnavailable | ErrorCode::StorageUnavailable => 502,
            ErrorCode::SandboxStarting | ErrorCode::NoHealthyInstance | ErrorCode::ReleaseUnavailable => 503,
            ErrorCode::UpstreamTimeout => 504,
            ErrorCode::InternalError => 500,
        }
    }

    /// Stable machine-readable code.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidHost => "invalid_host",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UriTooLong => "uri_too_long",
            ErrorCode::RequestHeaderTooLarge => "request_header_too_large",
            ErrorCode::RequestTimeout => "request_timeout",
            ErrorCode::UnknownHost => "unknown_host",
            ErrorCode::NotFound => "not_found",
            ErrorCode::PreviewNotFound => "preview_not_found",
            ErrorCode::DomainNotVerified => "domain_not_verified",
            ErrorCode::PreviewAuthRequired => "preview_auth_required",
            ErrorCode::PreviewTokenInvalid => "preview_token_invalid",
            ErrorCode::PreviewTokenExpired => "preview_token_expired",
            ErrorCode::ShareTokenInvalid => "share_token_invalid",
            ErrorCode::ShareTokenExpired => "share_token_expired",
            ErrorCode::SharePasswordRequired => "share_password_required",
            ErrorCode::TooManyAttempts => "too_many_attempts",
            ErrorCode::SandboxUnavailable => "sandbox_unavailable",
            ErrorCode::SandboxStarting => "sandbox_starting",
            ErrorCode::UpstreamTimeout => "upstream_timeout",
            ErrorCode::NoHealthyInstance => "no_healthy_instance",
            ErrorCode::ReleaseUnavailable => "release_unavailable",
            ErrorCode::ObjectNotFound => "object_not_found",
            ErrorCode::StorageUnavailable => "storage_unavailable",
            ErrorCode::InternalError => "internal_error",
        }
    }

    /// Seconds for `Retry-After`, where a retry makes sense.
    pub fn retry_after(self) -> Option<u32> {
        match self {
            ErrorCode::SandboxStarting => Some(5),
            ErrorCode::TooManyAttempts => Some(60),
            ErrorCode::NoHealthyInstance | ErrorCode::ReleaseUnavailable => Some(10),
            _ => None,
        }
    }

    /// The one-line message used in JSON errors.
    pub fn message(self) -> &'static str {
        match self {
            ErrorCode::InvalidHost => "The request's Host header is missing or malformed.",
            ErrorCode::BadRequest => "The request is malformed or ambiguous and was not forwarded.",
            ErrorCode::UriTooLong => "The request's address (URL) is too long.",
            ErrorCode::RequestHeaderTooLarge => "The request's headers are too large or too many.",
            ErrorCode::RequestTimeout => "The request was not received in time.",
            ErrorCode::UnknownHost => "No app or preview is configured for this host.",
            ErrorCode::NotFound => "There is no page at this address in this app.",
            ErrorCode::PreviewNotFound => "There is no preview for this sandbox and port.",
            ErrorCode::DomainNotVerified => "This domain's DNS records have not been verified yet.",
            ErrorCode::PreviewAuthRequired => "This preview is private: open it with an access link or token.",
            ErrorCode::PreviewTokenInvalid => "The preview token is not valid for this preview.",
            ErrorCode::PreviewTokenExpired => "The preview token has expired.",
            ErrorCode::ShareTokenInvalid => "The share token is unknown, revoked, or for another preview.",
            ErrorCode::ShareTokenExpired => "The share token has expired.",
            ErrorCode::SharePasswordRequired => "This share link is protected by a password.",
            ErrorCode::TooManyAttempts => "Too many wrong passwords; wait a minute before trying again.",
            ErrorCode::SandboxUnavailable => "Nothing accepted the connection: no server is listening on this port.",
            ErrorCode::SandboxStarting => "The sandbox is starting; retry in a few seconds.",
            ErrorCode::UpstreamTimeout => "The server did not answer in time.",
            ErrorCode::NoHealthyInstance => "No healthy instance of this app is available right now.",
            ErrorCode::ReleaseUnavailable => "This version of the app cannot be served right now.",
            ErrorCode::ObjectNotFound => "There is no public file at this address.",
            ErrorCode::StorageUnavailable => "The file store cannot be reached right now.",
            ErrorCode::InternalError => "The edge could not handle this request.",
        }
    }
}
