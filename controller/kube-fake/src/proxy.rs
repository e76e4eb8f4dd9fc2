//! Node proxy: `/api/v1/nodes/{node}/proxy/{path}` answered by handlers tests register.
//!
//! A real API server forwards these requests to the node's kubelet (for example the kubelet
//! checkpoint API, `POST /checkpoint/{namespace}/{pod}/{container}`). Here a test registers a
//! closure per node name that sees the method, the path below `proxy`, the query and the body,
//! and returns a status and body. Nodes without a handler answer 404 NotFound, as a proxy to a
//! node that does not exist would.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, StatusCode};

/// One request forwarded to a node.
#[derive(Debug, Clone)]
pub struct NodeProxyRequest {
    /// HTTP method.
    pub method: Method,
    /// Node name (without any `:port`).
    pub node: String,
    /// Path below `/proxy`, starting with `/` (e.g. `/checkpoint/default/p1/main`).
    pub path: String,
    /// Raw query string, empty when none.
    pub query: String,
    /// Raw request body.
    pub body: Bytes,
}

/// What the node answers.
#[derive(Debug, Clone)]
pub struct NodeProxyResponse {
    /// HTTP status.
    pub status: StatusCode,
    /// `Content-Type` of the body.
    pub content_type: String,
    /// Response body.
    pub body: Bytes,
}

impl NodeProxyResponse {
    /// A response with a body of any type (sent as `application/octet-stream`).
    pub fn new(status: StatusCode, body: impl Into<Bytes>) -> Self {
        NodeProxyResponse {
            status,
            content_type: "application/octet-stream".into(),
            body: body.into(),
        }
    }

    /// A JSON response.
    pub fn json(status: StatusCode, body: &serde_json::Value) -> Self {
        NodeProxyResponse {
            status,
            content_type: "application/json".into(),
            body: Bytes::from(serde_json::to_vec(body).unwrap_or_default()),
        }
    }
}

/// A registered node proxy handler.
#[derive(Clone)]
pub(crate) struct ProxyHandler(
    pub Arc<dyn Fn(&NodeProxyRequest) -> NodeProxyResponse + Send + Sync>,
);

impl fmt::Debug for ProxyHandler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ProxyHandler")
    }
}
