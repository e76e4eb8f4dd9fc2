//! Fault injection: make chosen requests fail the way a flaky API server or network does.
//!
//! Data model: a list of [`Fault`]s in injection order. Each incoming request is matched against
//! them (method, path prefix, watch or not); the first match answers for it and uses up one of
//! its `times` (a fault with `times: None` stays until [`crate::FakeCluster::clear_faults`]).
//! [`FaultEffect::Status`] answers with a `Status` body of the given code (kube surfaces it as
//! `kube::Error::Api`); [`FaultEffect::Unreachable`] fails the call at the transport level
//! (kube surfaces it as `kube::Error::Service`), as a refused connection would.

use http::Method;

/// What a matching request gets instead of its normal answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultEffect {
    /// Answer with this status code, `Status.reason` and `Status.message`.
    Status {
        /// HTTP status code, e.g. 500, 503, 429, 409.
        code: u16,
        /// `Status.reason`, e.g. `InternalError`, `ServiceUnavailable`.
        reason: String,
        /// `Status.message`.
        message: String,
    },
    /// Fail the call with a transport error (no HTTP response at all).
    Unreachable,
}

/// One injected fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    /// Only requests with this method (`None`: any method).
    pub method: Option<Method>,
    /// Only requests whose path starts with this (empty: any path).
    pub path_prefix: String,
    /// `Some(true)`: only watch requests; `Some(false)`: only non-watch requests.
    pub watch: Option<bool>,
    /// How many matching requests it answers (`None`: until cleared).
    pub times: Option<usize>,
    /// What those requests get.
    pub effect: FaultEffect,
}

impl Fault {
    /// The next matching request is answered with `code` (reason picked from the code).
    pub fn status(code: u16) -> Self {
        let reason = match code {
            400 => "BadRequest",
            401 => "Unauthorized",
            403 => "Forbidden",
            404 => "NotFound",
            409 => "Conflict",
            410 => "Expired",
            422 => "Invalid",
            429 => "TooManyRequests",
            503 => "ServiceUnavailable",
            504 => "Timeout",
            _ => "InternalError",
        };
        Fault {
            method: None,
            path_prefix: String::new(),
            watch: None,
            times: Some(1),
            effect: FaultEffect::Status {
                code,
                reason: reason.to_owned(),
                message: format!("injected fault: {reason}"),
            },
        }
    }

    /// The next matching request fails with a transport error.
    pub fn unreachable() -> Self {
        Fault {
            method: None,
            path_prefix: String::new(),
            watch: None,
            times: Some(1),
            effect: FaultEffect::Unreachable,
        }
    }

    /// Restricts the fault to one method and a path prefix.
    pub fn on(mut self, method: Method, path_prefix: &str) -> Self {
        self.method = Some(method);
        self.path_prefix = path_prefix.to_owned();
        self
    }

    /// Restricts the fault to a path prefix (any method).
    pub fn path(mut self, path_prefix: &str) -> Self {
        self.path_prefix = path_prefix.to_owned();
        self
    }

    /// Restricts the fault to watch requests (`true`) or to all other requests (`false`).
    pub fn watches(mut self, watch: bool) -> Self {
        self.watch = Some(watch);
        self
    }

    /// Answers this many matching requests.
    pub fn times(mut self, times: usize) -> Self {
        self.times = Some(times);
        self
    }

    /// Answers every matching request until the faults are cleared.
    pub fn always(mut self) -> Self {
        self.times = None;
        self
    }

    /// Sets the Status message.
    pub fn message(mut self, text: &str) -> Self {
        if let FaultEffect::Status { message, .. } = &mut self.effect {
            *message = text.to_owned();
        }
        self
    }

    pub(crate) fn matches(&self, method: &Method, path: &str, is_watch: bool) -> bool {
        self.times != Some(0)
            && self.method.as_ref().is_none_or(|m| m == method)
            && path.starts_with(&self.path_prefix)
            && self.watch.is_none_or(|w| w == is_watch)
    }
}

/// The transport error an [`FaultEffect::Unreachable`] fault produces.
#[derive(Debug, thiserror::Error)]
#[error("connection refused (fault injected by kube-fake)")]
pub struct InjectedUnreachable;

/// Finds the first fault matching the request and uses up one of its answers.
pub(crate) fn take_matching(
    faults: &mut Vec<Fault>,
    method: &Method,
    path: &str,
    is_watch: bool,
) -> Option<FaultEffect> {
    let index = faults
        .iter()
        .position(|f| f.matches(method, path, is_watch))?;
    let fault = faults.get_mut(index)?;
    let effect = fault.effect.clone();
    if let Some(times) = fault.times.as_mut() {
        *times -= 1;
        if *times == 0 {
            faults.remove(index);
        }
    }
    Some(effect)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_match_in_order_and_run_out() {
        let mut faults = vec![
            Fault::status(503)
                .on(Method::PATCH, "/api/v1/nodes")
                .times(2),
            Fault::unreachable().watches(true).always(),
        ];
        assert_eq!(
            take_matching(&mut faults, &Method::GET, "/api/v1/nodes", false),
            None
        );
        assert!(matches!(
            take_matching(&mut faults, &Method::PATCH, "/api/v1/nodes/n1", false),
            Some(FaultEffect::Status { code: 503, .. })
        ));
        assert!(take_matching(&mut faults, &Method::PATCH, "/api/v1/nodes/n1", false).is_some());
        assert_eq!(
            take_matching(&mut faults, &Method::PATCH, "/api/v1/nodes/n1", false),
            None
        );
        assert_eq!(faults.len(), 1);
        for _ in 0..3 {
            assert_eq!(
                take_matching(&mut faults, &Method::GET, "/api/v1/pods", true),
                Some(FaultEffect::Unreachable)
            );
        }
    }
}
