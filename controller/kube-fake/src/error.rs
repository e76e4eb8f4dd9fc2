//! API errors as the real API server reports them.
//!
//! Owns [`ApiError`], the one error enum of the request handlers, and its rendering into a
//! `meta/v1 Status` body with the HTTP code and `reason` the Kubernetes API conventions assign
//! (NotFound 404, AlreadyExists 409, Conflict 409, BadRequest 400, Invalid 422, Gone/Expired 410,
//! MethodNotAllowed 405, InternalError 500). kube-client turns such a body into
//! `kube::Error::Api(Status)`, so controller code sees exactly what a real cluster would send.

use serde_json::{Value, json};

/// What went wrong with one API request, in the API server's own vocabulary.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// The addressed object (or resource path) does not exist.
    #[error("{resource} \"{name}\" not found")]
    NotFound {
        /// Resource plural, e.g. `pods`.
        resource: String,
        /// API group, empty for the core group.
        group: String,
        /// Object name (may be empty for an unknown path).
        name: String,
    },
    /// A create found an object of that name already there.
    #[error("{resource} \"{name}\" already exists")]
    AlreadyExists {
        /// Resource plural.
        resource: String,
        /// API group.
        group: String,
        /// Object name.
        name: String,
    },
    /// Optimistic concurrency failed (stale resourceVersion or failed precondition).
    #[error("{message}")]
    Conflict {
        /// Resource plural.
        resource: String,
        /// API group.
        group: String,
        /// Object name.
        name: String,
        /// Human-readable reason, as the API server words it.
        message: String,
    },
    /// The request itself is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// The object failed validation.
    #[error("{message}")]
    Invalid {
        /// Resource plural.
        resource: String,
        /// API group.
        group: String,
        /// Object name.
        name: String,
        /// What is invalid.
        message: String,
    },
    /// A watch asked for a resourceVersion older than the kept history.
    #[error("too old resource version: {requested} ({oldest})")]
    Expired {
        /// The version the client asked for.
        requested: u64,
        /// The oldest version the history can still replay from.
        oldest: u64,
    },
    /// The verb is not supported on this path.
    #[error("the server does not allow this method on the requested resource")]
    MethodNotAllowed,
    /// Anything else (also used for faults injected with code 500).
    #[error("Internal error occurred: {0}")]
    Internal(String),
    /// An arbitrary status injected by a test through [`crate::Fault`].
    #[error("{message}")]
    Injected {
        /// HTTP status code to answer with.
        code: u16,
        /// Status `reason`.
        reason: String,
        /// Status `message`.
        message: String,
    },
}

impl ApiError {
    /// The HTTP status code this error is answered with.
    pub fn code(&self) -> u16 {
        match self {
            ApiError::NotFound { .. } => 404,
            ApiError::AlreadyExists { .. } | ApiError::Conflict { .. } => 409,
            ApiError::BadRequest(_) => 400,
            ApiError::Invalid { .. } => 422,
            ApiError::Expired { .. } => 410,
            ApiError::MethodNotAllowed => 405,
            ApiError::Internal(_) => 500,
            ApiError::Injected { code, .. } => *code,
        }
    }

    /// The `reason` field of the Status body.
    pub fn reason(&self) -> &str {
        match self {
            ApiError::NotFound { .. } => "NotFound",
            ApiError::AlreadyExists { .. } => "AlreadyExists",
            ApiError::Conflict { .. } => "Conflict",
            ApiError::BadRequest(_) => "BadRequest",
            ApiError::Invalid { .. } => "Invalid",
            ApiError::Expired { .. } => "Expired",
            ApiError::MethodNotAllowed => "MethodNotAllowed",
            ApiError::Internal(_) => "InternalError",
            ApiError::Injected { reason, .. } => reason,
        }
    }

    /// The full `meta/v1 Status` object for this error.
    pub fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.to_string(),
            "reason": self.reason(),
            "code": self.code(),
        });
        let details = match self {
            ApiError::NotFound {
                resource,
                group,
                name,
            }
            | ApiError::AlreadyExists {
                resource,
                group,
                name,
            }
            | ApiError::Conflict {
                resource,
                group,
                name,
                ..
            }
            | ApiError::Invalid {
                resource,
                group,
                name,
                ..
            } => Some(json!({ "name": name, "group": group, "kind": resource })),
            _ => None,
        };
        let details = match (self, details) {
            // A real server lists the invalid fields; kubectl prints only these causes (not
            // the message) for a 422, so the message travels as the one cause.
            (ApiError::Invalid { message, .. }, Some(mut details)) => {
                if let Some(map) = details.as_object_mut() {
                    map.insert(
                        "causes".into(),
                        json!([{ "reason": "FieldValueInvalid", "message": message, "field": "" }]),
                    );
                }
                Some(details)
            }
            (_, details) => details,
        };
        if let (Some(details), Some(map)) = (details, status.as_object_mut()) {
            map.insert("details".into(), details);
        }
        status
    }
}

/// Success `Status` body, as answered to a DELETE whose object is gone at once.
pub(crate) fn success_status(resource: &str, group: &str, name: &str, uid: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": { "name": name, "group": group, "kind": resource, "uid": uid },
    })
}
